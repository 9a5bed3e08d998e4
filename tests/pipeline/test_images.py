"""One decoding policy (pipeline.images): the pixels the proposals stage searches are the pixels a
shard stores, for every image mode; bad files fail with their category, never with an exception
of another kind."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import images as image_io
from pipeline.proposals import decode as proposals_decode
from pipeline.shards import shard_bytes

W, H = 48, 32


def gradient(w: int = W, h: int = H) -> np.ndarray:
    """A smooth RGB image (JPEG keeps it within a few levels), no channel equal to another."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([40 + 160 * x / w, 30 + 180 * y / h, 200 - 100 * (x + y) / (w + h)], axis=2).astype(np.uint8)


def jpeg(rgb: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def write_modes(folder: Path) -> dict[str, Path]:
    """One tiny file per mode a new user's data brings."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = gradient()
    files = {}
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.jpg", quality=95)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "palette.png")
    alpha = np.tile(np.linspace(0, 255, W, dtype=np.uint8), (H, 1))          # 0 (transparent) .. 255
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "rgba.png")
    gray16 = (rgb[:, :, 1].astype(np.uint16) * 257)
    Image.fromarray(gray16).save(folder / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                                      # "rotate 90 CW to display"
    (folder / "exif.jpg").write_bytes(jpeg(rgb, exif=exif.tobytes()))
    Image.fromarray(rgb).save(folder / "rgb.png")
    for p in sorted(folder.iterdir()):
        files[p.stem + p.suffix.replace(".", "_")] = p
    return files


@pytest.fixture(scope="module")
def modes(tmp_path_factory) -> dict[str, Path]:
    return write_modes(tmp_path_factory.mktemp("modes"))


def test_files_have_the_modes_under_test(modes):
    got = {n: Image.open(p).mode for n, p in modes.items()}
    assert got == {"cmyk_jpg": "CMYK", "gray_png": "L", "gray_jpg": "L", "palette_png": "P", "rgba_png": "RGBA",
                   "gray16_png": "I;16", "exif_jpg": "RGB", "rgb_png": "RGB"}


@pytest.mark.parametrize("name", ["cmyk_jpg", "gray_png", "gray_jpg", "palette_png", "rgba_png", "gray16_png",
                                  "exif_jpg", "rgb_png"])
def test_proposals_pixels_are_the_shards_pixels(modes, name):
    """What the proposals stage searched equals what the shard holds, decoded as the stream does.
    JPEG sources are stored as they are: the same pixels exactly. Others are re-encoded once: the
    shard holds exactly the JPEG of the proposals' pixels, within JPEG's error of them."""
    path = modes[name]
    seen, notes = proposals_decode(path, W, H)
    assert seen.shape == (H, W, 3) and seen.dtype == np.uint8
    stored, reencoded = shard_bytes(path.read_bytes(), W, H, 95)
    shard_pixels, _ = image_io.decode(stored, W, H)
    if not reencoded:
        assert stored == path.read_bytes()
        np.testing.assert_array_equal(shard_pixels, seen)
    else:
        np.testing.assert_array_equal(shard_pixels, image_io.decode(image_io.encode_jpeg(seen, 95))[0])
        assert np.abs(shard_pixels.astype(int) - seen).mean() < 6, name     # white or black-flattened: ~100


def test_the_policy_per_mode(modes):
    rgb = gradient()
    # 16-bit: scaled to 8 bits (PIL's own conversion clips at 255: a solid white image)
    np.testing.assert_array_equal(image_io.decode(modes["gray16_png"])[0], np.repeat(rgb[:, :, 1:2], 3, axis=2))
    # alpha dropped: the stored colour under it, even where fully transparent (not flattened onto a background)
    np.testing.assert_array_equal(image_io.decode(modes["rgba_png"])[0], rgb)
    # grayscale and palette: three equal channels / the palette's colours
    g = image_io.decode(modes["gray_png"])[0]
    assert (g[:, :, 0] == g[:, :, 1]).all() and (g[:, :, 1] == g[:, :, 2]).all()
    with Image.open(modes["palette_png"]) as im:
        np.testing.assert_array_equal(image_io.decode(modes["palette_png"])[0], np.asarray(im.convert("RGB")))
    # CMYK: converted, close to the RGB it came from (PIL's naive CMYK is exact up to JPEG's error)
    assert np.abs(image_io.decode(modes["cmyk_jpg"])[0].astype(int) - rgb).mean() < 4
    # EXIF orientation: never applied; the stored 48x32 grid, the frame of the table and the boxes
    pixels, notes = image_io.decode(modes["exif_jpg"], W, H)
    assert pixels.shape == (H, W, 3) and notes == {"exif_orientation": 6}
    assert image_io.decode(modes["cmyk_jpg"])[1] == {"mode": "CMYK"}


def sof_patched(data: bytes, width: int, height: int) -> bytes:
    """JPEG bytes whose header (baseline SOF0) states another size: a cheap 'huge' JPEG."""
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[i + 9:]


def test_bad_bytes_fail_with_their_category(tmp_path: Path):
    good = jpeg(gradient())
    png = io.BytesIO()
    Image.fromarray(gradient()).save(png, "PNG")
    png = png.getvalue()
    cases = {
        "corrupt": (png[:100] + bytes(b ^ 0xFF for b in png[100:300]) + png[300:], W, H),
        "truncated": (good[: len(good) // 2], W, H),
        "not_an_image": (b"\xff\xd8\xff" + b"password=hunter2\n" * 20, W, H),
        "not_an_image_empty": (b"", W, H),
        "size_mismatch": (good, W + 1, H),
        "too_large": (sof_patched(good, 20000, 20000), 20000, 20000),
    }
    for name, (data, w, h) in cases.items():
        with pytest.raises(image_io.ImageFailure) as e:
            shard_bytes(data, w, h, 95)
        assert e.value.reason == name.removesuffix("_empty"), name
        assert "0x" not in e.value.detail and "BytesIO" not in e.value.detail, e.value.detail   # no object repr
        with pytest.raises(ValueError):          # what the stream already catches
            image_io.decode(data, w, h)
    with pytest.raises(image_io.ImageFailure, match="missing_file"):
        image_io.decode(tmp_path / "nothing.jpg")


def test_pixel_limit_is_pils_limit(monkeypatch):
    """Over Image.MAX_IMAGE_PIXELS is too_large (PIL itself raises only above twice the limit)."""
    data = jpeg(gradient())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", W * H - 1)
    with pytest.raises(image_io.ImageFailure, match="too_large"):
        image_io.decode(data)


def test_a_jpeg_is_stored_up_to_its_end_marker_never_what_follows(tmp_path: Path):
    """Bytes after a JPEG's end-of-image marker (appended text, a phone's motion-photo video, the
    other frames of an MPO) are no part of the image: the shard must not carry them, and the part
    it keeps must be the whole image, whatever end markers hide inside segments or scans."""
    rgb = gradient()
    plain, progressive = jpeg(rgb), jpeg(rgb, progressive=True)
    inner = jpeg(gradient(8, 8))                       # a thumbnail with its own FF D9, inside a segment
    with_segment = plain[:2] + b"\xff\xfe" + (len(inner) + 2).to_bytes(2, "big") + inner + plain[2:]
    mpo = io.BytesIO()
    Image.fromarray(rgb).save(mpo, "MPO", save_all=True, append_images=[Image.fromarray(rgb[::-1].copy())])
    mpo = mpo.getvalue()
    secret = b"AWS_SECRET_ACCESS_KEY=abc\n" + b"\xff\xd9" + b"\x00" * 64   # an end marker in the tail too
    for name, image, tail in [("plain", plain, secret), ("progressive", progressive, secret),
                              ("segment", with_segment, secret), ("plain_no_tail", plain, b"")]:
        stored, reencoded = shard_bytes(image + tail, W, H, 95)
        assert not reencoded and stored == image, name
    stored, _ = shard_bytes(mpo, W, H, 95)
    assert len(stored) < len(mpo) and b"MPF" in stored                 # the first frame, its header kept
    np.testing.assert_array_equal(image_io.decode(stored, W, H)[0], image_io.decode(mpo, W, H)[0])
