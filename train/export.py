"""Export a pre-trained student backbone for the downstream toolboxes.

    python -m train.export --checkpoint runs/d3ssl/checkpoint.pt --out runs/d3ssl/export
    python -m train.export --random --arch resnet18 --seed 0 --out runs/random/seed0/export

The second form writes a randomly initialised network (torchvision's initialisation, seeded,
`weights=None`) in the same two formats: the `random` reference of the evaluations.

Writes in `--out`:
- `backbone.pth`: a plain torchvision ResNet `state_dict` (every key but `fc.*`), so
      net = torchvision.models.resnet50(); net.load_state_dict(torch.load(p), strict=False)
  leaves only `fc.weight` and `fc.bias` missing (all evaluations of `eval/` take this file);
- `backbone_detectron2.pkl`: the same weights with detectron2's names, renamed as MoCo's
  `convert-pretrain-to-detectron2.py` does (stem., resN, convN.norm, shortcut), for
  `MODEL.WEIGHTS` with `MODEL.PIXEL_MEAN/STD` of torchvision and `INPUT.FORMAT RGB`;
- `export.json`: where the weights come from (method, arch, step) and their checksums.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import sys
from pathlib import Path

import torch

from pipeline import cli
from pipeline.files import atomic_path, write_text

log = logging.getLogger(__name__)


def backbone_from_checkpoint(state: dict) -> dict[str, torch.Tensor]:
    """torchvision ResNet keys from a pre-training checkpoint's student (student.c4.*, student.res5.*)."""
    from train.resnet import torchvision_backbone

    out = torchvision_backbone(state["model"], prefix="student.")
    if not out:
        raise ValueError("the checkpoint holds no student backbone (keys student.c4.* / student.res5.*)")
    return out


def detectron2_names(backbone: dict[str, torch.Tensor]) -> dict[str, "object"]:
    """MoCo's renaming of torchvision ResNet keys to detectron2's, values as numpy arrays."""
    out = {}
    for k, v in backbone.items():
        if k.endswith("num_batches_tracked"):
            continue
        name = k if "layer" in k else "stem." + k
        for t in (1, 2, 3, 4):
            name = name.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            name = name.replace(f"bn{t}", f"conv{t}.norm")
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[name] = v.detach().cpu().numpy()
    return out


def random_backbone(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """A seeded, randomly initialised torchvision ResNet state_dict (without fc): `train.resnet.seeded_resnet`,
    the network `eval.backbone.build_resnet(arch, "random", seed)` evaluates."""
    from train.resnet import seeded_resnet

    return {k: v for k, v in seeded_resnet(arch, seed).state_dict().items() if not k.startswith("fc.")}


def export(checkpoint: Path | None, out: Path, arch: str | None = None, seed: int = 0) -> dict:
    """Export a checkpoint's student backbone, or (checkpoint None) a random `arch` seeded by `seed`."""
    if checkpoint is None:
        state = {"method": "random", "arch": arch, "step": 0}
        backbone = random_backbone(arch, seed)
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        backbone = {k: v.detach().cpu().contiguous() for k, v in backbone_from_checkpoint(state).items()}
    return write_export(backbone, out, {"checkpoint": str(checkpoint) if checkpoint else None, "method": state.get("method"),
                                        "arch": state.get("arch"), "step": state.get("step")})


def write_export(backbone: dict[str, torch.Tensor], out: Path, info: dict) -> dict:
    """Write `backbone` (torchvision names) as backbone.pth, backbone_detectron2.pkl and export.json."""
    backbone = {k: v.detach().cpu().contiguous() for k, v in backbone.items()}
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(backbone, buf)
    with atomic_path(out / "backbone.pth") as tmp:
        tmp.write_bytes(buf.getvalue())
    d2 = pickle.dumps({"model": detectron2_names(backbone), "__author__": "D3SSL", "matching_heuristics": True})
    with atomic_path(out / "backbone_detectron2.pkl") as tmp:
        tmp.write_bytes(d2)
    info = {
        "checkpoint": None, **info, "keys": len(backbone),
        "sha256": {"backbone.pth": hashlib.sha256(buf.getvalue()).hexdigest(),
                   "backbone_detectron2.pkl": hashlib.sha256(d2).hexdigest()},
    }
    write_text(out / "export.json", json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m train.export", __doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a train.pretrain checkpoint")
    src.add_argument("--random", action="store_true", help="a randomly initialised network instead")
    p.add_argument("--arch", help="with --random: resnet18, resnet50, ...")
    p.add_argument("--seed", type=int, default=0, help="with --random: the initialisation seed")
    p.add_argument("--out", required=True, type=Path, help="export folder (backbone.pth, backbone_detectron2.pkl, "
                                                           "export.json)")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    if args.random and not args.arch:
        p.error("--random needs --arch")
    info = export(None if args.random else args.checkpoint, args.out, args.arch, args.seed)
    log.info("wrote %s: %d tensors of a %s (%s, step %s)", args.out, info["keys"], info["arch"], info["method"],
             info["step"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
