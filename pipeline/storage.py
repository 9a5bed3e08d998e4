"""Where data lives: one module turns a location (a local path, `file://...`, or an object-store
URL such as `s3://bucket/prefix` or `gs://bucket/prefix`) into file operations.

Every stage reads and writes images, proposal parts, shards, sidecars and `index.json` through
these functions, so the same command runs on a laptop folder and on a bucket:

    storage.write_bytes("s3://bucket/shards/index.json", data)    # atomic
    storage.read_bytes("data/shards/index.json")
    storage.glob(storage.join("s3://bucket/proposals", "part-*.parquet"))

Local locations go straight to the operating system (`open`, `os.replace`), exactly as before any
URL was supported. URLs go through fsspec (s3fs for `s3://`, gcsfs for `gs://`, installed
separately); credentials and the endpoint come from the environment each library reads
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `AWS_PROFILE`,
`GOOGLE_APPLICATION_CREDENTIALS`, ...). `AWS_ENDPOINT_URL` (an S3-compatible server: MinIO, Ceph,
a test server) is passed to s3fs explicitly, here and only here.

Atomic writes: a local file is written under a temporary sibling name and renamed (`os.replace`);
an object is uploaded under a temporary key beside its final key and then moved (copy + delete),
so a reader never sees a partial object under a final name. A writer of several objects writes
the one that marks completion (a shard's stamp, `index.json`) last.

Any failure to reach a location (a bad URL, an unknown scheme, a missing bucket, missing or wrong
credentials) is a `StorageError` whose one-line message names the location; a missing object or
file is a `FileNotFoundError` naming it.
"""
from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class StorageError(OSError):
    """A location that cannot be reached: bad URL, unknown scheme, missing bucket or credentials."""


def scheme(loc: str | Path) -> str:
    """'s3' for 's3://b/k', '' for a local path (and for 'file://' URLs)."""
    m = _SCHEME.match(str(loc))
    return "" if m is None or m.group(1).lower() == "file" else m.group(1).lower()


def is_url(loc: str | Path) -> bool:
    """True for an object-store URL (anything with a scheme but `file://`)."""
    return bool(scheme(loc))


def local_path(loc: str | Path) -> Path:
    """The local path of a local location ('file:///x' -> Path('/x'))."""
    s = str(loc)
    return Path(s[len("file://"):]) if s.lower().startswith("file://") else Path(s)


def join(base: str | Path, *parts: str) -> str:
    """`base` / parts, as a string: a URL stays a URL, a local path stays relative if it was."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])
    return str(local_path(base).joinpath(*parts))


def name(loc: str | Path) -> str:
    """The last component of a location ('s3://b/x/train-000001.tar' -> 'train-000001.tar')."""
    return str(loc).rstrip("/").rsplit("/", 1)[-1]


def _storage_options(proto: str) -> dict:
    if proto in ("s3", "s3a"):
        # botocore reads AWS_ENDPOINT_URL itself too; passing it makes the endpoint explicit and
        # the same for every client this process creates.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"endpoint_url": endpoint, "use_listings_cache": False} if endpoint else {"use_listings_cache": False}
    return {}


def filesystem(loc: str | Path):
    """(fsspec filesystem, path inside it) of an object-store URL."""
    import fsspec

    proto = scheme(loc)
    try:
        fs = fsspec.filesystem(proto, **_storage_options(proto))
    except (ImportError, ValueError) as e:
        raise StorageError(f"{loc}: no file system for '{proto}://' ({e}); install its fsspec "
                           "backend (s3fs for s3://, gcsfs for gs://) or use a local path") from None
    return fs, fs._strip_protocol(str(loc))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"


@contextlib.contextmanager
def errors(loc: str | Path, doing: str = "access") -> Iterator[None]:
    """Re-raise what an object store raises as a one-line StorageError (or FileNotFoundError)
    naming `loc`, with the likely fix. A missing object stays a FileNotFoundError when reading;
    when writing, listing or deleting, "not found" means the bucket is missing (s3fs reports
    NoSuchBucket as FileNotFoundError without the URL): a StorageError naming `loc`."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        if doing in ("read", "open", "look up") or not is_url(loc):
            raise
        raise StorageError(f"cannot {doing} {loc}: {_one_line(e)}; check the bucket name, or create "
                           "the bucket") from None
    except Exception as e:  # noqa: BLE001 - botocore, aiohttp, google-auth: each raises its own
        text = _one_line(e)
        if "credential" in text.lower() or "accessdenied" in text.lower() or "signature" in text.lower():
            hint = "set the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE; " \
                   "GOOGLE_APPLICATION_CREDENTIALS for gs://)"
        elif "nosuchbucket" in text.lower() or "bucket" in text.lower():
            hint = "check the bucket name, or create the bucket"
        else:
            hint = "check the URL, the endpoint (AWS_ENDPOINT_URL) and the network"
        raise StorageError(f"cannot {doing} {loc}: {text}; {hint}") from None


def _missing(loc: str | Path) -> FileNotFoundError:
    return FileNotFoundError(f"no file or object at {loc}")


def exists(loc: str | Path) -> bool:
    if not is_url(loc):
        return local_path(loc).exists()
    fs, path = filesystem(loc)
    with errors(loc, "look up"):
        return fs.exists(path)


def isfile(loc: str | Path) -> bool:
    if not is_url(loc):
        return local_path(loc).is_file()
    fs, path = filesystem(loc)
    with errors(loc, "look up"):
        return fs.isfile(path)


def glob(pattern: str | Path) -> list[str]:
    """Sorted locations matching a glob pattern (in the last component(s)); URLs keep their scheme."""
    if not is_url(pattern):
        p = local_path(pattern)
        return sorted(str(x) for x in p.parent.glob(p.name))
    fs, path = filesystem(pattern)
    proto = scheme(pattern)
    with errors(pattern, "list"):
        return sorted(f"{proto}://{x}" for x in fs.glob(path))


def makedirs(loc: str | Path) -> None:
    """Create a local folder (object stores have no folders: nothing to do)."""
    if not is_url(loc):
        local_path(loc).mkdir(parents=True, exist_ok=True)


def remove(loc: str | Path) -> None:
    """Delete a file or object if it is there."""
    if not is_url(loc):
        local_path(loc).unlink(missing_ok=True)
        return
    fs, path = filesystem(loc)
    with errors(loc, "delete"):
        if fs.exists(path):
            fs.rm_file(path)


def open(loc: str | Path, mode: str = "rb"):  # noqa: A001 - the module's `open`, like io.open
    """A file object for reading (`rb`) a location; a missing one is a FileNotFoundError."""
    if not is_url(loc):
        return builtins.open(local_path(loc), mode)
    fs, path = filesystem(loc)
    try:
        with errors(loc, "open"):
            return fs.open(path, mode)
    except FileNotFoundError:
        raise _missing(loc) from None



def read_bytes(loc: str | Path) -> bytes:
    if not is_url(loc):
        return local_path(loc).read_bytes()
    fs, path = filesystem(loc)
    try:
        with errors(loc, "read"):
            return fs.cat_file(path)
    except FileNotFoundError:
        raise _missing(loc) from None


def read_text(loc: str | Path) -> str:
    return read_bytes(loc).decode()


def sha256(loc: str | Path) -> str:
    """sha256 hex digest of a file or object, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(loc, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


DIGEST_THREADS = 16     # files hashed at once by `digests` (I/O bound: on object storage, one GET each)


def digest(loc: str | Path) -> str:
    """sha256 of the bytes at `loc` now, or "" when that file cannot be read (missing, a folder,
    no permission): what a stamp records for an input it could not read, so a file that appears
    or is fixed later changes the stamp. A store that cannot be reached at all (`StorageError`:
    credentials, endpoint, bucket) raises: that is the job's problem, and must not make every
    finished output look changed (and be thrown away)."""
    try:
        return sha256(loc)
    except StorageError:
        raise
    except OSError:
        return ""


def digests(locs: list[str]) -> list[str]:
    """`digest` of each of `locs`, in order, `DIGEST_THREADS` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    if len(locs) <= 1:
        return [digest(loc) for loc in locs]
    with ThreadPoolExecutor(min(DIGEST_THREADS, len(locs))) as pool:
        return list(pool.map(digest, locs))


def worker_location(loc: str | Path) -> str:
    """`loc` as a process started in another working folder (a Ray worker, on this node or
    another) must open it: a URL unchanged, a local path absolute (a relative path in an images
    table is relative to the driver's folder; `ray start` workers run in the folder `ray start`
    ran in)."""
    return str(loc) if is_url(loc) else str(local_path(loc).absolute())


def tmp_location(loc: str | Path) -> str:
    """A unique temporary sibling of `loc` ('.NAME.tmp-xxxxxxxx' in the same folder or prefix)."""
    from pipeline.files import tmp_basename

    base, _, last = str(loc).rstrip("/").rpartition("/")
    return f"{base}/{tmp_basename(last)}" if base else tmp_basename(last)


@contextlib.contextmanager
def atomic_write(loc: str | Path) -> Iterator[Path]:
    """Yield a local temporary path to write; on success its content appears at `loc` at once
    (local: renamed over it; object store: uploaded under a temporary key, then moved). On error
    nothing appears at `loc`."""
    if not is_url(loc):
        from pipeline.files import atomic_path

        with atomic_path(local_path(loc)) as tmp:
            yield tmp
        return
    fs, path = filesystem(loc)
    folder = tempfile.mkdtemp(prefix="d3ssl-upload-")
    try:
        tmp = Path(folder) / name(loc)
        yield tmp
        key = tmp_location(path)
        with errors(loc, "write"):
            fs.put_file(str(tmp), key)
            try:
                fs.mv(key, path)
            finally:
                if fs.exists(key):
                    fs.rm_file(key)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_bytes(loc: str | Path, data: bytes) -> None:
    """Write `data` to `loc` atomically."""
    from pipeline import files

    files.write_bytes(loc, data, atomic=atomic_write)


def write_text(loc: str | Path, text: str) -> None:
    from pipeline import files

    files.write_text(loc, text, atomic=atomic_write)


def stale_temporaries(folder: str | Path, prefix: str = "") -> list[str]:
    """Temporary files (`.NAME.tmp-xxxxxxxx`) a killed writer left in `folder` (names from `prefix`)."""
    return [x for x in glob(join(folder, f".{prefix}*.tmp-*"))
            if re.fullmatch(r"\..+\.tmp-[0-9a-f]{8}", name(x))]


def read_table(loc: str | Path, contract):
    """A parquet table written under a `pipeline.contracts` contract, from a path or URL; every
    error names `loc`."""
    from pipeline import contracts

    if not is_url(loc):
        return contracts.read_table(local_path(loc), contract)
    import io

    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(read_bytes(loc)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{contract.name} table {loc} does not exist") from None
    return contracts.from_parquet(table, contract, str(loc))


def write_table(table, loc: str | Path, contract) -> str:
    """Validate and atomically write `table` under `contract` (same bytes as a local write)."""
    from pipeline import contracts

    if not is_url(loc):
        return str(contracts.write_table(table, local_path(loc), contract))
    contracts.conform(table, contract, where=str(loc))     # fail before anything is uploaded
    folder = tempfile.mkdtemp(prefix="d3ssl-table-")
    try:
        tmp = contracts.write_table(table, Path(folder) / name(loc), contract)
        write_bytes(loc, tmp.read_bytes())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return str(loc)
