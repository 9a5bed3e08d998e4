"""Region-level augmentations (paper section 4.1, 4.2; Table 5) as batched tensor functions.

Everything runs on the device the batch is on, over a whole batch at once:
    images  (B, C, H, W) float, normalised (so 0 is the mean colour)
    boxes   (B, K, 4) float (x1, y1, x2, y2) in pixels of that image
    valid   (B, K) bool
Each augmentation is two steps: `sample_*` draws its random parameters from a torch.Generator (on
the batch's device), `apply_*` is a deterministic function of the batch and the parameters. The
split makes the batched result checkable against a per-sample loop, and a run reproducible.

- PRC, proposal-based random cutout (section 4.1, 1): proposals from large to small; each cutout
  keeps its proposal's height/width ratio with a size ratio (cutout side / proposal side) drawn from
  [0.2, 0.5]; a cutout may not cover another, smaller proposal by more than `prc_overlap` of that
  proposal's area, otherwise the overlapped part is restored. Fill: 0 after normalisation, as
  SoCo's cutout. Each proposal gets a cutout with probability `prc_p` (paper silent; SoCo's
  cutout_prob 0.5). The threshold is not given in the paper: 0.25, the most a proposal's own
  cutout can take of it (0.5^2).
- PRM, proposal-based random mask (section 4.1, 2), see `sample_prm`.
- RBJ, restricted box jitter (section 4.1, 3): width and height scaled by U(1 - rbj_shrink, 1) and
  the centre moved so that the box stays inside the original: never larger, never outside. The
  paper gives no range; 0.2 is the width of SoCo's +-0.1 jitter range, kept below 1.
- C, the de-positioning composition (section 4.2, eq. 6-8), see `sample_shift` and `compose`.
- Backgrounds: every use of a foreign image (PRM in x1-hat, PRM in x2s-hat, the background of x3)
  takes its own donor from the batch (`train.backgrounds`), so no positive pair shares foreign
  content that the queue's negatives lack.
- SoCo's own region augmentations (random cutout in a box, box jitter) for the `soco` baseline and
  the Table 5 rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from train.backgrounds import backgrounds, resize_to


@dataclass(frozen=True)
class AugmentConfig:
    """The `augment` settings. Every augmentation can be switched off (Table 5 ablations)."""

    prc: bool = True
    prc_p: float = 0.5                              # SoCo's cutout_prob
    prc_size: tuple[float, float] = (0.2, 0.5)      # paper: cutout side / proposal side
    prc_overlap: float = 0.25                       # max share of a smaller proposal a cutout may cover
    prm: bool = True
    prm_p: float = 0.5                              # paper silent: prc_p's value (SoCo's cutout_prob)
    prm_scale: tuple[float, float] = (0.2, 0.6)     # paper: rectangle area / proposal area
    prm_ratio: tuple[float, float] = (0.75, 1.3333333)  # paper: rectangle aspect ratio
    prm_fill: Literal["background", "zero"] = "background"
    rbj: bool = True
    rbj_shrink: float = 0.2
    compose: bool = True                            # de-positioning composition (L_dp)
    compose_prc: bool = True                        # eq. 7: cut the shifted mask with PRC
    shift: Literal["anchor", "within"] = "anchor"   # how t is drawn, see `sample_shift`
    shift_min_visible: float = 0.5                  # anchor: a shifted box keeps this share on the canvas, or leaves L_dp
    # SoCo (C4 recipe): cutout of U(0.1, 0.3) of a box's area with p=0.5; box jitter +-0.1.
    cutout: bool = False
    cutout_p: float = 0.5
    cutout_area: tuple[float, float] = (0.1, 0.3)
    box_jitter: bool = False
    box_jitter_p: float = 0.5
    box_jitter_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.shift not in ("anchor", "within"):
            raise ValueError(f"augment.shift is {self.shift!r}; use anchor or within")
        if not 0.0 < self.shift_min_visible <= 1.0:
            raise ValueError(f"augment.shift_min_visible is {self.shift_min_visible}; it must lie in (0, 1]")


def _uniform(shape, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=device)


def rect_masks(rects: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, 4) pixel rectangles -> (B, N, H, W) bool: the pixels whose centre lies inside."""
    ys = torch.arange(height, device=rects.device, dtype=rects.dtype) + 0.5
    xs = torch.arange(width, device=rects.device, dtype=rects.dtype) + 0.5
    x1, y1, x2, y2 = (rects[..., i, None, None] for i in range(4))
    inside_x = (xs >= x1) & (xs < x2)          # (B, N, 1, W)
    inside_y = (ys[:, None] >= y1) & (ys[:, None] < y2)   # (B, N, H, 1)
    return inside_x & inside_y


def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def intersection_area(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise over the last-but-one dims: a (B, N, 4), b (B, M, 4) -> (B, N, M)."""
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


# ------------------------------------------------------------------------------------------ PRC


def sample_prc(boxes: torch.Tensor, valid: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> dict:
    """Cutout rectangles (B, K, 4), which are used (B, K), and the restore pairs (B, K, K).

    restore[b, i, j]: the cutout of proposal i covers more than `prc_overlap` of proposal j, a
    smaller one (processed after i, large to small), so the part of the cutout on j is restored.
    """
    B, K, _ = boxes.shape
    dev = boxes.device
    use = valid & (torch.rand((B, K), generator=g, device=dev) < cfg.prc_p)
    r = _uniform((B, K), *cfg.prc_size, g, dev)
    bw, bh = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    cw, ch = r * bw, r * bh                                     # same h/w ratio as the proposal
    x0 = boxes[..., 0] + torch.rand((B, K), generator=g, device=dev) * (bw - cw)
    y0 = boxes[..., 1] + torch.rand((B, K), generator=g, device=dev) * (bh - ch)
    cuts = torch.stack([x0, y0, x0 + cw, y0 + ch], dim=-1)
    area = torch.where(valid, box_area(boxes), torch.full_like(bw, -1.0))
    # processing order: large to small (ties by index); j comes after i
    rank = torch.argsort(torch.argsort(-area, dim=1, stable=True), dim=1)
    after = rank[:, None, :] > rank[:, :, None]                 # (B, i, j): j processed after i
    cover = intersection_area(cuts, boxes) / box_area(boxes)[:, None, :].clamp(min=1e-6)
    restore = use[:, :, None] & valid[:, None, :] & after & (cover > cfg.prc_overlap)
    return {"cuts": cuts, "use": use, "restore": restore}


def prc_mask(boxes: torch.Tensor, params: dict, height: int, width: int) -> torch.Tensor:
    """(B, H, W) bool: the pixels PRC removes."""
    cut = rect_masks(params["cuts"], height, width) & params["use"][..., None, None]       # (B, K, H, W)
    protected = rect_masks(boxes, height, width)                                           # (B, K, H, W)
    # for cutout i, the union of the smaller proposals it would cover too much
    restore = torch.einsum("bij,bjhw->bihw", params["restore"].to(torch.float32), protected.to(torch.float32)) > 0
    return (cut & ~restore).any(dim=1)


def apply_prc(images: torch.Tensor, boxes: torch.Tensor, params: dict) -> torch.Tensor:
    m = prc_mask(boxes, params, images.shape[-2], images.shape[-1])
    return images.masked_fill(m[:, None], 0.0)


# ------------------------------------------------------------------------------------------ PRM


def sample_prm(boxes: torch.Tensor, valid: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> dict:
    """Rectangles (B, K, 4) straddling one side of each proposal, and which are used (B, K).

    The paper: "To extract diverse nearby information with limited box jitter, we propose to
    randomly add partial background information from different directions of the proposal region.
    Note that the rectangular masks' scale and aspect ratio are randomly chosen from a range
    [0.2, 0.6] and [3/4, 4/3]."

    Our reading: RBJ only ever shrinks a box, so the context a box's feature sees would barely
    vary; PRM varies it. For a proposal (with probability `prm_p`; the paper gives none, and
    `prc_p`'s SoCo value 0.5 is used), a rectangle of `prm_scale` of
    its area and aspect in `prm_ratio` is centred on a random point of one of its four sides (a
    random direction): half of it lies in the proposal's border, half in its surroundings. The
    rectangle is filled with another image (the batch's background image, `prm_fill:
    background`) or with zeros (`zero`). Applied independently to the two views of a pair, the
    feature of the box must stay the same whatever enters its border and receptive field from
    one side, which is what de-coupling asks for (robust to the neighbours and the background).
    Swap the reading by changing this function and `apply_prm`; nothing else depends on it.
    """
    B, K, _ = boxes.shape
    dev = boxes.device
    use = valid & (torch.rand((B, K), generator=g, device=dev) < cfg.prm_p)
    s = _uniform((B, K), *cfg.prm_scale, g, dev)
    log_r = _uniform((B, K), math.log(cfg.prm_ratio[0]), math.log(cfg.prm_ratio[1]), g, dev)
    area = box_area(boxes) * s
    rw, rh = torch.sqrt(area * torch.exp(log_r)), torch.sqrt(area / torch.exp(log_r))
    side = torch.randint(0, 4, (B, K), generator=g, device=dev)          # left, right, top, bottom
    u = torch.rand((B, K), generator=g, device=dev)                      # position along the side
    x1, y1, x2, y2 = boxes.unbind(-1)
    cx = torch.where(side == 0, x1, torch.where(side == 1, x2, x1 + u * (x2 - x1)))
    cy = torch.where(side == 2, y1, torch.where(side == 3, y2, y1 + u * (y2 - y1)))
    rects = torch.stack([cx - rw / 2, cy - rh / 2, cx + rw / 2, cy + rh / 2], dim=-1)
    return {"rects": rects, "use": use}


def apply_prm(images: torch.Tensor, params: dict, fill: torch.Tensor | None) -> torch.Tensor:
    """Fill the PRM rectangles with `fill` (B, C, H, W) (the background images), or zeros if None."""
    m = (rect_masks(params["rects"], images.shape[-2], images.shape[-1]) & params["use"][..., None, None]).any(1)
    if fill is None:
        return images.masked_fill(m[:, None], 0.0)
    return torch.where(m[:, None], fill, images)


# ------------------------------------------------------------------------------------------ RBJ


def sample_rbj(boxes: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> dict:
    B, K, _ = boxes.shape
    dev = boxes.device
    return {
        "scale": _uniform((B, K, 2), 1.0 - cfg.rbj_shrink, 1.0, g, dev),
        "shift": torch.rand((B, K, 2), generator=g, device=dev),
    }


def apply_rbj(boxes: torch.Tensor, params: dict) -> torch.Tensor:
    """Boxes scaled down and moved, always inside the original box."""
    size = boxes[..., 2:] - boxes[..., :2]
    new = size * params["scale"]
    lo = boxes[..., :2] + params["shift"] * (size - new)
    return torch.cat([lo, lo + new], dim=-1)


# --------------------------------------------------------------------------- SoCo's originals


def sample_cutout(boxes: torch.Tensor, valid: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> dict:
    """SoCo's random cutout: a square of U(cutout_area) of the box's area centred inside the box."""
    B, K, _ = boxes.shape
    dev = boxes.device
    use = valid & (torch.rand((B, K), generator=g, device=dev) < cfg.cutout_p)
    side = torch.sqrt(_uniform((B, K), *cfg.cutout_area, g, dev) * box_area(boxes))
    cx = boxes[..., 0] + torch.rand((B, K), generator=g, device=dev) * (boxes[..., 2] - boxes[..., 0])
    cy = boxes[..., 1] + torch.rand((B, K), generator=g, device=dev) * (boxes[..., 3] - boxes[..., 1])
    rects = torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=-1)
    return {"rects": rects, "use": use}


def apply_cutout(images: torch.Tensor, params: dict) -> torch.Tensor:
    return apply_prm(images, params, None)


def sample_box_jitter(boxes: torch.Tensor, valid: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> dict:
    B, K, _ = boxes.shape
    dev = boxes.device
    r = cfg.box_jitter_ratio
    return {
        "use": valid & (torch.rand((B, K), generator=g, device=dev) < cfg.box_jitter_p),
        "scale": _uniform((B, K, 2), 1.0 - r, 1.0 + r, g, dev),
        "shift": _uniform((B, K, 2), -r, r, g, dev),
    }


def apply_box_jitter(boxes: torch.Tensor, params: dict, height: int, width: int) -> torch.Tensor:
    """SoCo's box jitter: size x U(1 - r, 1 + r), centre moved by U(-r, r) x size; clipped to the image."""
    size = boxes[..., 2:] - boxes[..., :2]
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2 + params["shift"] * size
    half = size * params["scale"] / 2
    lim = boxes.new_tensor([width, height])
    new = torch.cat([(centre - half).clamp(min=0), torch.minimum(centre + half, lim)], dim=-1)
    return torch.where(params["use"][..., None], new, boxes)


# -------------------------------------------------------------------------- the composition C


def _room(lo_box: torch.Tensor, hi_box: torch.Tensor, height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """Integer t (B, 2) uniform over the shifts that keep [lo_box, hi_box] (B, 2 each) on the canvas."""
    size = lo_box.new_tensor([width, height])
    lo, hi = torch.ceil(-lo_box), torch.floor(size - hi_box)
    hi = torch.maximum(hi, lo)
    u = torch.rand(lo.shape, generator=g, device=lo.device)
    return torch.floor(lo + u * (hi - lo + 1)).clamp(max=hi).to(torch.long)


def sample_shift(boxes: torch.Tensor, valid: torch.Tensor, height: int, width: int, g: torch.Generator,
                 mode: str = "anchor") -> torch.Tensor:
    """Integer shift t (B, 2) = (tx, ty), one per image, for the boxes of x2.

    - `within`, the letter of eq. 6: t keeps every valid box inside the image. With the proposals
      cut to the x2 crop their union spans most of the view, so t is mostly about zero.
    - `anchor` (default), our reading of "blend the proposal regions in another image and at
      another location": one valid box per image, the anchor, is drawn at random and t is uniform
      over the shifts that keep the anchor inside the image; the other boxes move with it (the same
      t for all, as eq. 6) and are cut to the image, and a box left with less than
      `shift_min_visible` of its area takes no part in L_dp (`depositioning_boxes`).
    """
    if mode == "within":
        big = torch.finfo(boxes.dtype).max
        lo_box = torch.stack([torch.where(valid, boxes[..., i], big).amin(1) for i in (0, 1)], -1)
        hi_box = torch.stack([torch.where(valid, boxes[..., i], -big).amax(1) for i in (2, 3)], -1)
    elif mode == "anchor":
        score = torch.rand(valid.shape, generator=g, device=boxes.device).masked_fill(~valid, -1.0)
        anchor = boxes.gather(1, score.argmax(1)[:, None, None].expand(-1, 1, 4))[:, 0]
        lo_box, hi_box = anchor[:, :2], anchor[:, 2:]
    else:
        raise ValueError(f"unknown shift mode {mode!r}; use anchor or within")
    return _room(lo_box, hi_box, height, width, g)


def depositioning_boxes(boxes: torch.Tensor, valid: torch.Tensor, t: torch.Tensor, height: int, width: int,
                        min_visible: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(b-hat = b + t cut to the image (B, K, 4), valid3 (B, K)): which boxes take part in L_dp.

    A box that keeps at least `min_visible` of its area is compared through its visible part in x3
    with the whole box in x1-hat and x2 (a crop-like positive pair eq. 6's letter does not have;
    with `shift: within` every box stays whole)."""
    moved = boxes + t[:, None, :].to(boxes.dtype).repeat(1, 1, 2)
    lim = boxes.new_tensor([width, height, width, height])
    cut = torch.minimum(moved.clamp(min=0), lim)
    kept = box_area(cut) >= min_visible * box_area(boxes).clamp(min=1e-6)
    return cut, valid & kept & (box_area(cut) > 0)


def shift_px(t: torch.Tensor) -> torch.Tensor:
    """Mean |t| (Euclidean, pixels of the x2 view) over the batch: the logged `shift_px`."""
    return t.float().norm(dim=1).mean()


def shift_images(images: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """out[b, :, y, x] = images[b, :, y - ty, x - tx] (edge pixels repeated where out of range)."""
    B, C, H, W = images.shape
    ys = (torch.arange(H, device=images.device)[None] - t[:, 1:2]).clamp(0, H - 1)     # (B, H)
    xs = (torch.arange(W, device=images.device)[None] - t[:, 0:1]).clamp(0, W - 1)     # (B, W)
    index = (ys[:, :, None] * W + xs[:, None, :]).reshape(B, 1, H * W).expand(B, C, H * W)
    return images.reshape(B, C, H * W).gather(2, index).reshape(B, C, H, W)


def compose(x2: torch.Tensor, boxes3: torch.Tensor, valid3: torch.Tensor, xb: torch.Tensor, t: torch.Tensor,
            prc_params: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The composition C of eq. 6-8: (x3, pasted mask m-hat).

    `boxes3`/`valid3` are the shifted boxes b-hat = b + t that take part (`depositioning_boxes`);
    m-hat is their union (eq. 6, moved by t), cut again with PRC when `prc_params` (drawn for the
    shifted boxes) is given (eq. 7); x3 takes x2's pixels moved by t wherever m-hat is set, and the
    background image xb everywhere else (eq. 8). Every pixel under m-hat comes from inside a box
    of x2, never from beyond the view's edge.
    """
    H, W = x2.shape[-2:]
    m_hat = (rect_masks(boxes3, H, W) & valid3[..., None, None]).any(1)          # (B, H, W)
    if prc_params is not None:
        m_hat = m_hat & ~prc_mask(boxes3, prc_params, H, W)
    x3 = torch.where(m_hat[:, None], shift_images(x2, t), xb)
    return x3, m_hat


# ------------------------------------------------------------------------ the recipes


def augment_view(x: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, cfg: AugmentConfig,
                 g: torch.Generator, fill: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """The image-side region augmentations of one view, each when switched on: PRC, then PRM
    (filled from `fill`, or zeros with `prm_fill: zero`), then SoCo's cutout. Returns the image and
    the drawn parameters (for pictures)."""
    drawn: dict = {}
    if cfg.prc:
        drawn["prc"] = sample_prc(boxes, valid, cfg, g)
        x = apply_prc(x, boxes, drawn["prc"])
    if cfg.prm:
        drawn["prm"] = sample_prm(boxes, valid, cfg, g)
        x = apply_prm(x, drawn["prm"], fill if cfg.prm_fill == "background" else None)
    if cfg.cutout:
        drawn["cutout"] = sample_cutout(boxes, valid, cfg, g)
        x = apply_cutout(x, drawn["cutout"])
    return x, drawn


def jitter_boxes(boxes: torch.Tensor, valid: torch.Tensor, cfg: AugmentConfig, g: torch.Generator,
                 height: int, width: int) -> torch.Tensor:
    """The box-side augmentations of one feature extraction, each when switched on: RBJ, then
    SoCo's box jitter."""
    if cfg.rbj:
        boxes = apply_rbj(boxes, sample_rbj(boxes, cfg, g))
    if cfg.box_jitter:
        boxes = apply_box_jitter(boxes, sample_box_jitter(boxes, valid, cfg, g), height, width)
    return boxes


def needs_backgrounds(cfg: AugmentConfig) -> bool:
    return (cfg.prm and cfg.prm_fill == "background") or cfg.compose


def region_views(batch: dict, cfg: AugmentConfig, g: torch.Generator) -> dict:
    """The region-augmented inputs of D3SSL for a normalised batch (section 4.2).

    eq. 2: x1-hat = PRM(PRC(x1)), x2s-hat = PRM(PRC(x2s)), each with its own draws and its own
    background donor; eq. 6-8: x3 = C(x2, m, xb, m-hat) with the shift t (`cfg.shift`), the
    shifted boxes and a third donor as xb. SoCo's cutout and box jitter apply too when switched on
    (the paper's Table 5 rows). Every feature extraction gets its own box jitter, so the two boxes
    of a positive pair are two independent jitters of the same proposal.
    Returns images x1h, x2sh, x3, boxes for the student (s1, s2s, s3) and teacher (t1, t2), `valid3`
    (which boxes take part in L_dp), `mask3` (m-hat) and `shift_px`.
    """
    x1, x2, x2s = batch["x1"], batch["x2"], batch["x2s"]
    b1, b2, b2s, valid = batch["boxes1"], batch["boxes2"], batch["boxes2s"], batch["valid"]
    bg = backgrounds(x1, 3, g) if needs_backgrounds(cfg) else [None, None, None]

    out = {"x1h": augment_view(x1, b1, valid, cfg, g, bg[0])[0],
           "x2sh": augment_view(x2s, b2s, valid, cfg, g,
                                None if bg[1] is None else resize_to(bg[1], x2s.shape[-1]))[0]}
    H, W = x2.shape[-2:]
    if cfg.compose:
        t = sample_shift(b2, valid, H, W, g, cfg.shift)
        b3, valid3 = depositioning_boxes(b2, valid, t, H, W, cfg.shift_min_visible)
        prc3 = sample_prc(b3, valid3, cfg, g) if (cfg.compose_prc and cfg.prc) else None
        out["x3"], out["mask3"] = compose(x2, b3, valid3, bg[2], t, prc3)
        out["valid3"], out["shift_px"] = valid3, shift_px(t)

    def jitter(boxes, size):
        return jitter_boxes(boxes, valid, cfg, g, size, size)

    out.update({"s1": jitter(b1, H), "s2s": jitter(b2s, x2s.shape[-1]), "t1": jitter(b1, H), "t2": jitter(b2, H)})
    if cfg.compose:
        out["s3"] = jitter(b3, H)
    return out
