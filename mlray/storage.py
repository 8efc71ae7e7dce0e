"""One storage layer: every path in mlray is a URI, resolved to a filesystem here.

Local paths, ``file://`` and ``s3://`` (any endpoint: AWS, MinIO, SeaweedFS) are
accepted everywhere. S3 settings come from the standard AWS environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``) or, on a cluster,
from the instance profile. pyarrow's ``S3FileSystem()`` ignores
``AWS_ENDPOINT_URL``, so it is passed explicitly here, once.

Writes are atomic: data goes to a local temporary file first and reaches its
final name only when complete (``os.replace`` locally, a single PUT/multipart
completion on S3), so a crash never leaves a half-written object behind.
"""

from __future__ import annotations

import contextlib
import concurrent.futures
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


class StorageError(OSError):
    """A path could not be read or written; the message names the URI."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_env() -> dict[str, str]:
    """The S3 settings of this process, to hand to Ray workers and jobs."""
    return {k: os.environ[k] for k in S3_ENV_VARS if os.environ.get(k)}


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None, key: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region or "us-east-1"}
    if key and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # Explicit keys travel with the filesystem when Ray pickles it to workers;
        # without them (instance profiles) each process resolves its own.
        kwargs.update(
            access_key=key, secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            session_token=os.environ.get("AWS_SESSION_TOKEN"),
        )
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        # Custom endpoints (MinIO, SeaweedFS, Ceph) expect path-style addressing.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the pyarrow filesystem and the path inside it for ``uri``."""
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        fs = _s3(s3_endpoint(), region, os.environ.get("AWS_ACCESS_KEY_ID"))
        return fs, uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), uri[len("file://") :]
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    if base.startswith("file://"):
        return "file://" + os.path.join(base[len("file://") :], *parts)
    return os.path.join(base, *parts)


def parent(uri: str) -> str:
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(uri))


def absolute(uri: str, base_dir: str) -> str:
    """``uri`` as an absolute URI; relative paths are taken relative to ``base_dir``."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    return join(base_dir, uri)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"{uri}: no such file or object") from e
    except OSError as e:
        raise StorageError(f"{uri}: {e}") from e


def _read_or_error(uri: str) -> bytes | StorageError:
    try:
        return read_bytes(uri)
    except StorageError as e:
        return e


def fetch_many(uris: list[str], concurrency: int = 16) -> list[bytes | StorageError]:
    """Read many objects concurrently, in order; a failure is returned, not raised.

    Threads suit this: object-store reads wait on the network and release the GIL.
    """
    if len(uris) <= 1 or concurrency <= 1:
        return [_read_or_error(u) for u in uris]
    with concurrent.futures.ThreadPoolExecutor(min(concurrency, len(uris))) as pool:
        return list(pool.map(_read_or_error, uris))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


@contextlib.contextmanager
def atomic_local_file(uri: str, suffix: str = "") -> Iterator[str]:
    """Yield a local temporary path; on success its content becomes ``uri``.

    On error nothing appears at ``uri``.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{uuid.uuid4().hex}{suffix}")
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fd, tmp = tempfile.mkstemp(prefix="mlray-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        try:
            pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        except OSError as e:
            raise StorageError(f"{uri}: upload failed: {e}") from e
    finally:
        os.remove(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_local_file(uri) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (used for run directories)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(path, exist_ok=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local_dir: str) -> None:
    fs, path = resolve(uri)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def list_files(
    uri: str, suffixes: tuple[str, ...] = (), recursive: bool = True, skip_hidden: bool = True
) -> list[str]:
    """All files under ``uri`` (a directory/prefix, or one file), as sorted URIs.

    Names starting with ``_`` or ``.`` (reports, temporary files) are skipped
    unless ``skip_hidden`` is false.
    """
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: no such file, directory or prefix")
    out = []
    for f in fs.get_file_info(pafs.FileSelector(path, recursive=recursive)):
        name = posixpath.basename(f.path)
        if f.type != pafs.FileType.File or (skip_hidden and name.startswith((".", "_"))):
            continue
        if suffixes and not name.lower().endswith(suffixes):
            continue
        out.append(join(uri, posixpath.relpath(f.path, path)))
    return sorted(out)


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
