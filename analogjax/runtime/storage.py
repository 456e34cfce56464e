"""Where files live: a local directory or an object store (gs://, s3://), through one path type.

Every path a user names (a workdir, an --out or --output, teacher.checkpoint / hf_path / gguf_path / cache,
checkpoint.init_path) goes through `location`: an etils.epath Path, local (made absolute) or remote (kept as the URL
the user wrote, never turned into a local folder). Arrays written by tensorstore (teacher caches, zarr shards) name
the same place through `kvstore`. Orbax takes the epath Path as it is.

Object stores have no rename and no append: a rename is a copy and a delete (not atomic), and an object is written
whole. So an atomic write (`write_atomic`: run.json, config.yaml, a cache's provenance, metrics.jsonl) is a rename of
a temporary file on a local disk and a single object write on a bucket, which readers see whole or not at all (what
Orbax and tensorstore rely on there too). Files made by libraries that write local files only (safetensors, ArrayRecord,
matplotlib) are written into a local staging folder and uploaded file by file (`staged`); inputs such libraries read
(a teacher's safetensors or GGUF file on a bucket) are copied into the local cache first (`local_copy`).

Credentials are the libraries' own: gcsfs (behind epath) and google-auth look for Application Default Credentials
(GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, or a TPU/GCE VM's service account), as does
tensorstore. `check_reachable` turns a missing bucket or missing credentials into one `error:` before a run starts.
A GCS emulator is named by STORAGE_EMULATOR_HOST (epath/gcsfs) and TENSORSTORE_GCS_HTTP_URL (tensorstore).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

from etils import epath

from analogjax.errors import UserError

SCHEMES = ("gs", "s3")
# The fsspec package epath needs for each scheme, and the extra that installs it.
_BACKENDS = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://bucket/..., s3://bucket/...) rather than a local path."""
    return "://" in os.fspath(path)


def _split(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, key prefix) of an object-store URL."""
    scheme, rest = url.split("://", 1)
    bucket, _, key = rest.partition("/")
    return scheme, bucket, key.strip("/")


def location(path: str | os.PathLike, key: str = "path") -> epath.Path:
    """The one path type: a local path made absolute, or an object-store URL kept as written (a UserError naming
    `key` for a scheme analogjax cannot write to)."""
    text = os.fspath(path)
    if not is_remote(text):
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    scheme, bucket, _ = _split(text)
    if scheme not in SCHEMES or not bucket:
        raise UserError(f"{key} {text}: not a local path or a gs://BUCKET/... or s3://BUCKET/... URL")
    return epath.Path(text.rstrip("/"))


def kvstore(path: str | os.PathLike) -> str:
    """The tensorstore kvstore URL of a directory (file://, gs://, s3://), ending in '/'."""
    text = os.fspath(path)
    if is_remote(text):
        return text.rstrip("/") + "/"
    return "file://" + os.path.abspath(text).rstrip("/") + "/"


def write_atomic(path: epath.Path, data: str | bytes) -> None:
    """Replace `path` whole: readers see the old content or the new, never a part. Local: write a temporary file
    beside it and rename it over (same filesystem); object store: one object write, atomic by itself."""
    raw = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        path.write_bytes(raw)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_bytes(raw)
    os.replace(tmp, path)


def remove_tree(path: epath.Path) -> None:
    """Delete a folder and everything under it (every object under the prefix on a bucket)."""
    if is_remote(path):
        path.rmtree(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _copy_file(source: epath.Path, target: epath.Path) -> None:
    """Stream one file (local or an object) to `target` in 16 MiB pieces: one object write on a bucket."""
    with source.open("rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)


def move_tree(source: epath.Path, target: epath.Path) -> None:
    """Move a folder to `target` (which must not exist). Local: one rename. Object store: a prefix has no rename
    and no empty folders to rename into, so every object is copied, then the source deleted: an interruption
    leaves both copies, never neither."""
    if not is_remote(source):
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        return
    for file in files_under(source):
        _copy_file(file, target / os.path.relpath(os.fspath(file), os.fspath(source)))
    source.rmtree(missing_ok=True)


def check_reachable(path: str | os.PathLike, key: str) -> None:
    """Before any work: an object-store location's bucket exists and this machine's credentials reach it. One
    UserError naming the URL and what is missing; a local path passes."""
    text = os.fspath(path)
    if not is_remote(text):
        return
    location(text, key)
    scheme, bucket, _ = _split(text)
    module, extra = _BACKENDS[scheme]
    try:
        __import__(module)
    except ImportError:
        raise UserError(
            f"{key} {text}: {scheme}:// paths need the {module} package: pip install 'analogjax[{extra}]'"
        ) from None
    if scheme == "gs" and not os.environ.get("STORAGE_EMULATOR_HOST"):
        _check_google_credentials(text, key)
    root = epath.Path(f"{scheme}://{bucket}")
    try:
        found = root.exists()
    except Exception as exc:  # the backends raise their own types (HttpError, PermissionError, ClientError...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{key} {text}: cannot reach bucket {scheme}://{bucket} ({reason})") from None
    if not found:
        raise UserError(
            f"{key} {text}: bucket {scheme}://{bucket} does not exist (or these credentials cannot see it); create "
            "it first" + (f" (gcloud storage buckets create gs://{bucket})" if scheme == "gs" else "")
        )


def _check_google_credentials(text: str, key: str) -> None:
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
    except ImportError:  # gcsfs brings google-auth; without it gcsfs itself fails below with its own message
        return
    try:
        google.auth.default()
    except DefaultCredentialsError as exc:
        reason = str(exc).splitlines()[0]
        raise UserError(
            f"{key} {text}: no Google Cloud credentials found ({reason}); on a TPU or GCE VM the VM's service account "
            "is used, elsewhere run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from None


def check_config_paths(config, *extra: tuple[str, str | None]) -> None:
    """`check_reachable` for every object-store path of `config` (teacher.checkpoint / hf_path / gguf_path / cache,
    checkpoint.init_path) and for each (key, path) in `extra` (a command's --workdir or --out)."""
    teacher = config.teacher
    named = [
        ("teacher.checkpoint", teacher.checkpoint),
        ("teacher.hf_path", teacher.hf_path),
        ("teacher.gguf_path", teacher.gguf_path),
        ("teacher.cache", teacher.cache),
        ("checkpoint.init_path", config.checkpoint.init_path),
        *extra,
    ]
    seen: set[str] = set()
    for key, value in named:
        if value and is_remote(value):
            bucket = "/".join(_split(value)[:2])
            if bucket not in seen:
                check_reachable(value, key)
                seen.add(bucket)


def _cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "analogjax", "remote")


def local_copy(path: str | os.PathLike) -> str:
    """A local path holding the file or folder `path` names: `path` itself when local; for a URL, a copy in the
    user's cache (reused while every file's size matches), for libraries that read local files only."""
    text = os.fspath(path)
    if not is_remote(text):
        return text
    source = location(text)
    if not source.exists():
        raise UserError(f"{text}: no such file or folder")
    name = source.name or "root"
    target = os.path.join(_cache_root(), hashlib.sha256(text.encode()).hexdigest()[:16], name)
    files = [source] if not source.is_dir() else list(files_under(source))
    for file in files:
        rel = file.name if file == source else str(file)[len(str(source)) + 1 :]
        local = target if file == source else os.path.join(target, rel)
        if os.path.exists(local) and os.path.getsize(local) == file.stat().length:
            continue
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.{os.getpid()}.tmp"
        _copy_file(file, epath.Path(tmp))
        os.replace(tmp, local)
    return target


def files_under(root: epath.Path) -> Iterator[epath.Path]:
    """Every file under `root` (epath's rglob refuses '**' on buckets: one listing per folder instead)."""
    for child in sorted(root.iterdir()):
        if child.is_dir():
            yield from files_under(child)
        else:
            yield child


# Uploaded last: a reader that finds them (transformers starts from config.json) finds the rest of the folder.
_LAST = ("config.json", "README.md")


def upload_tree(local: str | os.PathLike, remote: epath.Path) -> None:
    """Copy every file under the local folder `local` to `remote`, each as one object write; config.json and
    README.md last."""
    local = os.fspath(local)
    files = [os.path.join(d, f) for d, _, names in os.walk(local) for f in names]
    for file in sorted(files, key=lambda f: (os.path.basename(f) in _LAST, f)):
        _copy_file(epath.Path(file), remote / os.path.relpath(file, local))


@contextlib.contextmanager
def output_folder(
    out: str | os.PathLike, key: str = "--out", force: bool = False, overwrite: bool = False
) -> Iterator[str]:
    """Where a command writes its output folder `out` with libraries that write local files only (safetensors,
    matplotlib): `out` itself when local; for a URL (first checked reachable, and empty unless `force` or
    `overwrite`), a local staging folder whose files are uploaded to `out` (see `upload_tree`) when the block ends
    without an error. `force` empties `out` first; `overwrite` replaces only the files written again (a report
    folder rewritten in place, as a local one is)."""
    text = os.fspath(out)
    if not is_remote(text):
        yield text
        return
    check_reachable(text, key)
    remote = location(text, key)
    if not (force or overwrite) and remote.is_dir() and any(remote.iterdir()):
        raise UserError(f"{key} {text} is not empty; choose another {key} or pass --force")
    with tempfile.TemporaryDirectory(prefix="analogjax-out-") as folder:
        yield folder
        if any(os.scandir(folder)):  # the process that wrote the files (process 0 of a job) uploads them
            if force:
                remove_tree(remote)
            upload_tree(folder, remote)


class ObjectFile:
    """A file that an object store holds whole: appends are buffered and the object rewritten on `flush`, and after
    a write when `min_interval` seconds have passed since the last rewrite (None: on `flush` only). A bucket throttles
    rewrites of one object to about one a second. The content already there is kept (a resumed run appends to its
    metrics.jsonl)."""

    def __init__(self, path: epath.Path, min_interval: float | None = 1.0):
        self.path = path
        self.min_interval = min_interval
        self._buffer = io.BytesIO()
        if path.exists():
            self._buffer.write(path.read_bytes())
        self._dirty = False
        self._flushed_at = 0.0

    def write(self, data: bytes) -> None:
        self._buffer.write(data)
        self._dirty = True
        if self.min_interval is not None and time.monotonic() - self._flushed_at >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        if not self._dirty:
            return
        self.path.write_bytes(self._buffer.getvalue())
        self._dirty = False
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        self.flush()


def register_tensorboard_writers() -> None:
    """Let tensorboardX write event files to gs:// and s3:// through epath (its own gs:// writer needs a Google Cloud
    project; its s3:// one, boto3): each events file is buffered and rewritten whole when TensorBoard flushes."""
    from tensorboardX import record_writer

    class Factory:
        def open(self, path: str) -> ObjectFile:
            return ObjectFile(epath.Path(path), min_interval=None)

        def directory_check(self, path: str) -> None:
            pass  # object stores have no folders to create

    for scheme in SCHEMES:
        record_writer.register_writer_factory(scheme, Factory())
