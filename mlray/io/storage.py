"""One storage layer: every path in mlray is a URI, resolved to a filesystem here.

Local paths, ``file://`` and ``s3://`` (any endpoint: AWS, MinIO, SeaweedFS) are
accepted everywhere. S3 settings come from the standard AWS environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``) or, on a cluster,
from the instance profile. pyarrow's ``S3FileSystem()`` ignores
``AWS_ENDPOINT_URL``, so it is passed explicitly here, once. The region is the
configured one (environment, AWS config), else the bucket's own, never a guess.

Errors are classified: throttling, timeouts, resets and 5xx are retried with
backoff and jitter a bounded number of times, then raised with ``transient``
set; not-found and access errors are raised at once.

Writes are atomic: data goes to a local temporary file first and reaches its
final name only when complete (``os.replace`` locally, a single PUT/multipart
completion on S3), so a crash never leaves a half-written object behind.
"""

from __future__ import annotations

import contextlib
import concurrent.futures
import os
import posixpath
import random
import tempfile
import time
import uuid
from collections.abc import Iterator
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# The S3 settings that may travel to Ray workers in the clear. Keys and session
# tokens never do: Ray logs a runtime_env in full (runtime_env_agent.log), so
# workers get credentials the way the driver does, from their own environment
# (the embedded Ray's workers inherit it) or the instance profile / IRSA role.
S3_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")

# Transient storage errors are retried RETRY_ATTEMPTS times in all, sleeping
# RETRY_BASE_S * 2^k seconds (half of it random jitter, capped at RETRY_MAX_S)
# in between: 0.5 + 1 + 2 + 4 + 8 s, 8-16 s in all, rides out a server restart.
RETRY_ATTEMPTS = int(os.environ.get("MLRAY_STORAGE_RETRIES", "6"))
RETRY_BASE_S = 0.5
RETRY_MAX_S = 8.0
_TRANSIENT_MARKERS = (
    "NETWORK_CONNECTION", "SLOW_DOWN", "THROTTL", "REQUEST_TIMEOUT", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
    "Could not connect", "Connection reset", "Connection refused", "timed out", "Timeout", "curlCode",
    "HTTP status 5", "HTTP response code: 5", "Broken pipe", "temporarily",
)
_PERMANENT_MARKERS = ("ACCESS_DENIED", "AccessDenied", "HTTP status 403", "NoSuchBucket", "InvalidAccessKeyId")


class StorageError(OSError):
    """A path could not be read or written; the message names the URI.

    ``transient`` is true when the cause was the store or the network (timeouts,
    throttling, resets, 5xx) and still there after retries: the object may be
    fine, so the row is worth trying again later, not recording as bad."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def is_transient(err: BaseException) -> bool:
    """Whether an error from a storage call is worth retrying."""
    if isinstance(err, StorageError):
        return err.transient
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (TimeoutError, ConnectionError)):
        return True
    if not isinstance(err, OSError):
        return False
    text = str(err)
    if any(m in text for m in _PERMANENT_MARKERS):
        return False
    return any(m in text for m in _TRANSIENT_MARKERS)


def retrying(fn, what: str, attempts: int | None = None):
    """``fn()`` with transient errors retried (backoff with jitter, bounded); any
    error that remains is raised as a ``StorageError`` naming ``what``."""
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    for k in range(max(1, attempts)):
        try:
            return fn()
        except StorageError:
            raise
        except FileNotFoundError as e:
            raise StorageError(f"{what}: no such file or object") from e
        except OSError as e:
            transient = is_transient(e)
            if not transient or k == attempts - 1:
                tries = f" (after {k + 1} attempts)" if transient and k else ""
                raise StorageError(f"{what}: {e}{tries}", transient=transient) from e
            delay = min(RETRY_MAX_S, RETRY_BASE_S * 2**k)
            time.sleep(delay / 2 + random.random() * delay / 2)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_env() -> dict[str, str]:
    """The non-secret S3 settings of this process, to hand to Ray workers."""
    return {k: os.environ[k] for k in S3_ENV_VARS if os.environ.get(k)}


def configured_region() -> str | None:
    """The region from the environment, else from the AWS config files (profile aware)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    try:
        import botocore.session  # comes with s3fs

        return botocore.session.Session().get_config_variable("region")
    except Exception:  # noqa: BLE001 - a broken AWS config file is not a region
        return None


@lru_cache(maxsize=256)
def bucket_region(bucket: str, endpoint: str | None) -> str:
    """Where a bucket lives: the configured region; with a custom endpoint
    (MinIO, SeaweedFS, Ceph: they ignore regions) ``us-east-1`` when none is
    configured; on AWS, asked of the bucket itself. pyarrow does not follow
    AWS's region redirects, so a wrong guess would fail every request."""
    region = configured_region()
    if region:
        return region
    if endpoint:
        return "us-east-1"
    try:
        return retrying(lambda: pafs.resolve_s3_region(bucket), f"s3://{bucket}: looking up the bucket's region")
    except StorageError as e:
        raise StorageError(f"{e}; set AWS_REGION to the bucket's region", transient=e.transient) from e


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    # No keys are passed: a pickled filesystem carries its arguments to Ray
    # workers, and each process resolves credentials itself (environment, AWS
    # config, instance profile / IRSA), so secrets never ride in task payloads.
    kwargs: dict = {"region": region}
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
        path = uri.split("://", 1)[1].rstrip("/")
        endpoint = s3_endpoint()
        return _s3(endpoint, bucket_region(path.split("/", 1)[0], endpoint)), path
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


def local_path(uri: str) -> str | None:
    """The absolute filesystem path of a local path or ``file://`` URI (a relative
    one taken from the current directory); None for a remote URI."""
    if is_remote(uri):
        return None
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def normalize(uri: str) -> str:
    """``uri`` with its ``.`` and ``..`` segments resolved lexically.

    Object stores do not resolve them (the key ``a/../b`` is an object of its
    own), so a relative URI that climbs out of its prefix is resolved here; one
    that climbs above its bucket is an error naming it.
    """
    if not is_remote(uri):
        scheme = "file://" if uri.startswith("file://") else ""
        path = os.path.normpath(uri[len(scheme) :])
        return scheme + (path[1:] if path.startswith("//") else path)  # POSIX keeps a leading '//'
    scheme, rest = uri.split("://", 1)
    bucket, _, key = rest.partition("/")
    out: list[str] = []
    for seg in key.split("/"):
        if seg == ".":
            continue
        if seg == "..":
            if not out:
                raise StorageError(f"{uri}: '..' climbs above the bucket {scheme}://{bucket}")
            out.pop()
            continue
        out.append(seg)  # empty segments stay: 'a//b' is a key of its own
    return f"{scheme}://{bucket}/" + "/".join(out)


def file_type(uri: str) -> pafs.FileType:
    fs, path = resolve(uri)
    return retrying(lambda: fs.get_file_info(path).type, uri)


def exists(uri: str) -> bool:
    return file_type(uri) != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return file_type(uri) == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    """An object's bytes; transient errors are retried, then raised with ``transient`` set."""
    fs, path = resolve(uri)
    return read_from(fs, path, uri)


def read_from(fs: pafs.FileSystem, path: str, what: str) -> bytes:
    """``read_bytes`` for a path on a filesystem already at hand (one Ray handed over)."""

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retrying(read, what)


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


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file's rows (``columns`` only, when given); transient errors retried."""
    fs, path = resolve(uri)
    return retrying(lambda: pq.read_table(path, filesystem=fs, columns=columns), uri)


def read_schema(uri: str) -> pa.Schema:
    """One Parquet file's schema (with its metadata), from the footer alone."""
    fs, path = resolve(uri)
    return retrying(lambda: pq.read_schema(path, filesystem=fs), uri)


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
        retrying(
            lambda: pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs),
            f"{uri}: upload",
        )
    finally:
        os.remove(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_local_file(uri) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (e.g. a folder of images to a bucket)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(path, exist_ok=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def list_files(
    uri: str, suffixes: tuple[str, ...] = (), recursive: bool = True, skip_hidden: bool = True
) -> list[str]:
    """All files under ``uri`` (a directory/prefix, or one file), as sorted URIs.

    Names starting with ``_`` or ``.`` (reports, temporary files) are skipped
    unless ``skip_hidden`` is false.
    """
    fs, path = resolve(uri)
    kind = file_type(uri)
    if kind == pafs.FileType.File:
        return [uri]
    if kind == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: no such file, directory or prefix")
    out = []
    infos = retrying(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=recursive)), f"{uri}: listing")
    for f in infos:
        name = posixpath.basename(f.path)
        if f.type != pafs.FileType.File or (skip_hidden and name.startswith((".", "_"))):
            continue
        if suffixes and not name.lower().endswith(suffixes):
            continue
        out.append(join(uri, posixpath.relpath(f.path, path)))
    return sorted(out)


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    kind = file_type(uri)
    if kind == pafs.FileType.Directory:
        retrying(lambda: fs.delete_dir(path), f"{uri}: delete")
    elif kind == pafs.FileType.File:
        retrying(lambda: fs.delete_file(path), f"{uri}: delete")
