"""Image-folder manifests: what the stages depend on instead of the image folders themselves.

DVC hashes every file of a folder that a stage lists as a dependency. For COCO and OpenImages that
is hundreds of gigabytes read on every `dvc status`, so no stage lists an image folder: each lists
the folder's manifest, a small text file with one line per image, and DVC hashes that instead.
Editing, adding or removing an image changes the manifest (once it is rewritten), which reruns
exactly the stages that read the folder.

    python -m pipeline.manifest --params params.yaml            # write every manifest
    python -m pipeline.manifest --params params.yaml --check    # exit 1 if a folder moved on

A manifest is a tab-separated file, sorted by path, with a header line:

    path            size    sha256   (mode "content": the bytes' digest)
    path            size    mtime_ns (mode "stat": no image is read; the default)

Paths are relative to the folder, so a manifest does not depend on where the data is mounted.
"stat" mode reads no image (a directory listing and one stat per file), and a copy that
keeps modification times (`rsync -a`, `cp -p`) keeps the manifest; "content" mode reads every byte
and is what the embedded data uses (a few megabytes), so its manifests equal on every machine.

Which folder each manifest describes (`FOLDERS`) is fixed: `coco_train2017` is
`<data.coco_root>/train2017`, `coco_val2017` is `<data.coco_root>/val2017` and `openimages_train`
is `<data.openimages_root>/train`; they are written to `data.manifests`.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline import cli, storage
from pipeline.files import write_text
from pipeline.params import ParamsError, load_section

log = logging.getLogger(__name__)

# manifest name -> (the `data` key of the root, the image folder under it)
FOLDERS: dict[str, tuple[str, str]] = {
    "coco_train2017": ("coco_root", "train2017"),
    "coco_val2017": ("coco_root", "val2017"),
    "openimages_train": ("openimages_root", "train"),
}
MODES = ("stat", "content")
SUFFIX = ".tsv"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` section of params.yaml: where the inputs live."""
    coco_root: str = "data/synth/coco"
    openimages_root: str = "data/synth/openimages"
    pretrain_images: str = "openimage_mini"
    manifests: str = "data/synth/manifests"
    generate: tuple[str, ...] = ("embedded",)


def folder_of(name: str, cfg: DataConfig) -> Path:
    """The image folder the manifest `name` describes."""
    key, sub = FOLDERS[name]
    return Path(getattr(cfg, key)) / sub


def manifest_path(name: str, manifests: str | Path) -> Path:
    return Path(manifests) / f"{name}{SUFFIX}"


def lines(folder: str | Path, mode: str = "stat") -> Iterator[str]:
    """The manifest of `folder` line by line (header first), files sorted by relative path."""
    if mode not in MODES:
        raise ValueError(f"manifest mode {mode!r}: use one of {list(MODES)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder; fix the `data` section of params.yaml "
                                "or create the folder")
    yield f"path\tsize\t{'sha256' if mode == 'content' else 'mtime_ns'}"
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    for p in paths:
        st = p.stat()
        third = storage.sha256(p) if mode == "content" else str(st.st_mtime_ns)
        yield f"{p.relative_to(folder).as_posix()}\t{st.st_size}\t{third}"


def render(folder: str | Path, mode: str = "stat") -> str:
    return "\n".join(lines(folder, mode)) + "\n"


def write(folder: str | Path, out: str | Path, mode: str = "stat") -> int:
    """Write the manifest of `folder` to `out` atomically; return the number of files listed."""
    text = render(folder, mode)
    write_text(out, text)
    return text.count("\n") - 1


def mode_of(path: str | Path) -> str:
    """The mode a manifest file was written in, read from its header."""
    header = Path(path).read_text().split("\n", 1)[0].split("\t")
    if header[:2] != ["path", "size"] or len(header) != 3 or header[2] not in ("sha256", "mtime_ns"):
        raise ValueError(f"{path}: line 1 is not a manifest header (path, size, sha256|mtime_ns); "
                         "rewrite it with `python -m pipeline.manifest --mode stat` (or `--mode content`)")
    return "content" if header[2] == "sha256" else "stat"


def stale(cfg: DataConfig) -> list[str]:
    """The manifests of `cfg.manifests` that are missing or no longer match their folder."""
    out = []
    for name in FOLDERS:
        path = manifest_path(name, cfg.manifests)
        if not path.is_file() or path.read_text() != render(folder_of(name, cfg), mode_of(path)):
            out.append(str(path))
    return out


def write_all(cfg: DataConfig, mode: str | None = None) -> dict[str, int]:
    """Write every manifest of `cfg` into `cfg.manifests`; return the file count of each. `mode`
    None keeps the mode each existing manifest was written in ("stat" for a new one), so a rewrite
    never switches a content manifest to modification times (which would change every stage's deps)."""
    counts = {}
    for name in FOLDERS:
        path = manifest_path(name, cfg.manifests)
        counts[name] = write(folder_of(name, cfg), path, mode or (mode_of(path) if path.is_file() else "stat"))
        log.info("%s: %d files listed from %s", manifest_path(name, cfg.manifests), counts[name],
                 folder_of(name, cfg))
    return counts


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipeline.manifest", __doc__)
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="params.yaml whose `data` section names the roots and the manifest folder")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="stat: size and modification time (reads no image); content: sha256 of each file; "
                        "default: the mode each existing manifest has, stat for a new one")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 naming each manifest that no longer matches its folder")
    args = p.parse_args(argv)
    cli.setup_logging(args.log_level)
    try:
        cfg = load_section(DataConfig, "data", args.params)
        if args.check:
            bad = stale(cfg)
            for path in bad:
                log.error("%s does not match its image folder: rerun `python -m pipeline.manifest "
                          "--params %s` and then `dvc repro`", path, args.params)
            log.info("%d of %d manifests match their folders", len(FOLDERS) - len(bad), len(FOLDERS))
            return 1 if bad else 0
        counts = write_all(cfg, args.mode)
    except (OSError, ValueError, ParamsError) as e:
        log.error("%s", e)
        return 1
    log.info("wrote %d manifests (%d files) to %s", len(counts), sum(counts.values()), cfg.manifests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
