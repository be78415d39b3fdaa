"""Run storage behind one URI: a local path, file://, s3://, gs://, or any scheme fsspec knows.

Nodes of a cluster share nothing but Ray and storage (../shared/DESIGN.md, "On a cluster"). A `Storage`
is a small picklable value (the URI string only) that the driver sends to every process; each process
resolves the filesystem itself, lazily, because filesystem objects do not pickle reliably (credentials,
sockets). Modelled on Ray Train's `StorageContext`: the driver writes a marker with a token, every
worker checks that it reads the same token, so a path that only the head can see fails at start with a
message that names the fix.

S3 is configured by the standard environment of each process: AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3)
for a non-AWS server, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), AWS_REGION (or
AWS_DEFAULT_REGION). Connect timeouts and retries are bounded so that a wrong endpoint fails in seconds
(SAEI_S3_CONNECT_TIMEOUT_S / SAEI_S3_REQUEST_TIMEOUT_S / SAEI_S3_MAX_ATTEMPTS override them).
"""

from __future__ import annotations

import os
import posixpath
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

MARKER_NAME = ".saei_storage_marker"
# Bounded so that a wrong endpoint fails in seconds, not minutes. On Linux the SDK applies the request
# timeout as curl's low-speed limit: a server that accepts and stays silent costs about
# request_timeout x attempts (measured: 60 s x 3 = 181 s). Each can be overridden per process by
# SAEI_S3_CONNECT_TIMEOUT_S, SAEI_S3_REQUEST_TIMEOUT_S, SAEI_S3_MAX_ATTEMPTS.
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 15.0
S3_MAX_ATTEMPTS = 3
_CHUNK = 64 * 1024 * 1024
_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "SAEI_S3_CONNECT_TIMEOUT_S",
           "SAEI_S3_REQUEST_TIMEOUT_S", "SAEI_S3_MAX_ATTEMPTS")


class StorageError(OSError):
    """Storage cannot be used as configured; the message names the URI and the likely fix."""


@dataclass(frozen=True)
class Storage:
    """A folder in run storage. `uri` is absolute: a relative local path is resolved against the cwd of
    the process that built the Storage (once, here), not of the process that later receives it."""

    uri: str

    def __post_init__(self):
        object.__setattr__(self, "uri", normalize_uri(str(self.uri)))

    # ---- paths -------------------------------------------------------------------------------------
    def join(self, *parts: str) -> Storage:
        """The Storage of a sub-folder or file (`parts` are relative, '/'-separated)."""
        rel = _rel(*parts)
        return Storage(f"{self.uri.rstrip('/')}/{rel}" if rel else self.uri)

    def __truediv__(self, part: str) -> Storage:
        return self.join(part)

    @property
    def is_local(self) -> bool:
        """True for a path on this node's own disk (which other nodes may not see)."""
        return "://" not in self.uri

    @property
    def local_path(self) -> Path | None:
        return Path(self.uri) if self.is_local else None

    def _fs(self, *parts: str) -> tuple[pafs.FileSystem, str]:
        fs, base = _resolve(self.uri, _env_key())
        rel = _rel(*parts)
        return fs, (posixpath.join(base, rel) if rel else base)

    # ---- bytes and text ----------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object so that readers see the old content or the new one, never a torn file
        (local: a temp file in the same folder, then a rename; S3 and GCS: one upload completes
        atomically). fsspec-backed schemes get what the backend gives."""
        fs, path = self._fs(rel)
        with self._errors("write", path):
            if fs.type_name == "local":
                _atomic_local_write(Path(path), data)
                return
            self._make_parent(fs, path)
            with fs.open_output_stream(path) as f:
                f.write(data)

    def read_bytes(self, rel: str = "") -> bytes:
        """The object's bytes; FileNotFoundError when it does not exist."""
        fs, path = self._fs(rel)
        with self._errors("read", path):
            if fs.get_file_info(path).type != pafs.FileType.File:
                raise FileNotFoundError(f"{self._show(rel)}: no such file in storage")
            with fs.open_input_stream(path) as f:
                return f.read()

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def read_text(self, rel: str = "") -> str:
        return self.read_bytes(rel).decode("utf-8")

    # ---- folders -----------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        fs, path = self._fs(rel)
        with self._errors("stat", path):
            return fs.get_file_info(path).type != pafs.FileType.NotFound

    def size(self, rel: str = "") -> int | None:
        """Bytes of a file; None when there is no file at `rel`."""
        fs, path = self._fs(rel)
        with self._errors("stat", path):
            info = fs.get_file_info(path)
        return info.size if info.type == pafs.FileType.File else None

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) directly inside a folder, sorted; [] when the folder does not exist."""
        fs, path = self._fs(rel)
        with self._errors("list", path):
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    def list_files(self, rel: str = "") -> list[str]:
        """Relative '/'-paths of every file under a folder, sorted; [] when it does not exist."""
        fs, path = self._fs(rel)
        with self._errors("list", path):
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
        root = path.rstrip("/") + "/"
        return sorted(i.path[len(root):] for i in infos if i.type == pafs.FileType.File and i.path.startswith(root))

    def delete(self, rel: str = "") -> None:
        """Delete a file or a whole folder; nothing happens when it does not exist."""
        fs, path = self._fs(rel)
        with self._errors("delete", path):
            kind = fs.get_file_info(path).type
            if kind == pafs.FileType.Directory:
                fs.delete_dir(path)
            elif kind != pafs.FileType.NotFound:
                fs.delete_file(path)

    def upload(self, local_dir: str | os.PathLike, rel: str = "") -> None:
        """Copy a local folder's files to `rel` (merged into what is there; same names overwritten)."""
        src = Path(local_dir).resolve()
        if not src.is_dir():
            raise FileNotFoundError(f"{src}: not a local folder")
        fs, path = self._fs(rel)
        with self._errors("upload to", path):
            if fs.type_name != "s3" and fs.type_name != "gcs":
                fs.create_dir(path, recursive=True)
            # Uploads to S3 with threads are unsafe in pyarrow (apache/arrow#32372; Ray Train does the same).
            pafs.copy_files(str(src), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                            chunk_size=_CHUNK, use_threads=fs.type_name != "s3")

    def download(self, local_dir: str | os.PathLike, rel: str = "") -> Path:
        """Copy the files under `rel` into a local folder (created); returns that folder."""
        dest = Path(local_dir).resolve()
        fs, path = self._fs(rel)
        with self._errors("download from", path):
            if fs.get_file_info(path).type != pafs.FileType.Directory:
                raise FileNotFoundError(f"{self._show(rel)}: no such folder in storage")
            dest.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                            chunk_size=_CHUNK)
        return dest

    # ---- probes ------------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Write, read back and delete a small probe file; StorageError (with the fix) when that fails.
        Call once at start in every process that will write here."""
        name = f".saei_write_probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        payload = uuid.uuid4().bytes
        try:
            self.write_bytes(name, payload)
            if self.read_bytes(name) != payload:
                raise StorageError(f"{self._show(name)}: read back different bytes than were written")
            self.delete(name)
        except StorageError:
            raise
        except OSError as e:  # a local FileNotFoundError/PermissionError: the folder cannot be made here
            raise StorageError(f"storage {self.uri} is not writable from this process on node "
                               f"{socket.gethostname()}: {e}") from e

    def write_marker(self) -> str:
        """Driver side: write `<uri>/.saei_storage_marker` holding a fresh token and return the token,
        to send to every worker's `check_visible`."""
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self.write_text(MARKER_NAME, token)
        return token

    def check_visible(self, token: str) -> None:
        """Worker side: StorageError unless this node reads the marker the driver just wrote."""
        try:
            found = self.read_text(MARKER_NAME)
        except FileNotFoundError:
            found = None
        if found == token:
            return
        seen = "no marker" if found is None else f"a different marker ({found!r}, from another run or node)"
        raise StorageError(
            f"storage {self.uri} is not shared with this node ({socket.gethostname()}): the driver wrote "
            f"{MARKER_NAME} with token {token!r} but this node finds {seen}. A local path exists only on "
            f"the node that wrote it: use a URI that every node can reach, e.g. s3://bucket/runs "
            f"(with AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY set on every node), "
            f"gs://bucket/runs, or a shared mount such as /mnt/nfs.")

    # ---- helpers -----------------------------------------------------------------------------------
    def _show(self, rel: str) -> str:
        return self.join(rel).uri if rel else self.uri

    @contextmanager
    def _errors(self, op: str, path: str):
        """Turn backend errors into StorageError naming the URI and the fix; missing files stay
        FileNotFoundError (callers ask "is it there" this way)."""
        try:
            yield
        except (StorageError, FileNotFoundError):
            raise
        except PermissionError as e:
            raise StorageError(f"cannot {op} {path} (storage {self.uri}): permission denied on node "
                               f"{socket.gethostname()}: {e}") from e
        except (OSError, pa.ArrowException) as e:
            raise StorageError(_explain(self.uri, op, str(e))) from e

    @staticmethod
    def _make_parent(fs: pafs.FileSystem, path: str) -> None:
        # Object stores have no folders to create (an S3 "folder" would be an extra empty object).
        if fs.type_name not in ("s3", "gcs"):
            fs.create_dir(posixpath.dirname(path), recursive=True)


def _atomic_local_write(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: a reader or a crash never sees a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    # os.open with 0o666 keeps the umask's permissions (mkstemp would make the file owner-only).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _rel(*parts: str) -> str:
    rel = posixpath.normpath("/".join(p.strip("/") for p in parts if p and p.strip("/")))
    if rel == ".":
        return ""
    if rel.startswith("..") or posixpath.isabs(rel):
        raise ValueError(f"storage path {'/'.join(parts)!r} leaves its folder")
    return rel


def normalize_uri(uri: str) -> str:
    """A local path becomes absolute (against this process's cwd) and file:// becomes a plain path;
    other URIs lose a trailing '/'."""
    if not uri:
        raise StorageError("empty storage URI: give a local path, file:///..., s3://bucket/prefix or gs://...")
    if "://" not in uri:
        return str(Path(uri).expanduser().resolve())
    if uri.startswith("file://"):
        return str(Path(urlsplit(uri).path or "/").resolve())
    return uri.rstrip("/") if urlsplit(uri).path.strip("/") else uri


def _env_key() -> tuple:
    # The filesystem is cached per process and per configuration: a test or a worker that changes the
    # environment gets a filesystem built from the new one.
    return (os.getpid(), *(os.environ.get(k) for k in _S3_ENV))


@lru_cache(maxsize=32)
def _resolve(uri: str, env_key: tuple) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    try:
        if scheme in ("s3", "s3a"):
            return _s3(parts.netloc), f"{parts.netloc}{parts.path}".rstrip("/")
        if scheme in ("gs", "gcs"):
            # The GCS client retries for 15 minutes by default; bound it like S3's.
            limit = _s3_limits()[1] * _s3_limits()[2]
            fs = pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=limit))
            return fs, f"{parts.netloc}{parts.path}".rstrip("/")
    except (OSError, ValueError) as e:
        raise StorageError(_explain(uri, "open", str(e))) from e
    return _fsspec(uri, scheme)


def _s3_limits() -> tuple[float, float, int]:
    """(connect timeout s, request timeout s, attempts), from SAEI_S3_* when set."""
    env = os.environ
    return (float(env.get("SAEI_S3_CONNECT_TIMEOUT_S") or S3_CONNECT_TIMEOUT_S),
            float(env.get("SAEI_S3_REQUEST_TIMEOUT_S") or S3_REQUEST_TIMEOUT_S),
            int(env.get("SAEI_S3_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS))


def _s3(bucket: str) -> pafs.S3FileSystem:
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    connect, request, attempts = _s3_limits()
    kwargs: dict = dict(connect_timeout=connect, request_timeout=request,
                        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))
    if endpoint:
        split = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=split.netloc, scheme=split.scheme)
    if region is None:
        # A custom endpoint (MinIO, moto, Ceph) ignores the region; AWS needs the bucket's own.
        region = "us-east-1" if endpoint else pafs.resolve_s3_region(bucket)
    return pafs.S3FileSystem(region=region, **kwargs)


def _fsspec(uri: str, scheme: str) -> tuple[pafs.FileSystem, str]:
    import fsspec

    try:
        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as e:
        raise StorageError(
            f"storage URI {uri}: unknown or unavailable scheme {scheme!r} ({e}). Use a local path, file://, "
            f"s3://bucket/prefix or gs://bucket/prefix, or install the fsspec package for {scheme}://") from e
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs._strip_protocol(uri).rstrip("/")


def _explain(uri: str, op: str, message: str) -> str:
    """The likely fix for a backend error, from the error text (pyarrow raises plain OSError)."""
    text = message.upper()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"AWS_ENDPOINT_URL={endpoint}" if endpoint else "AWS_ENDPOINT_URL unset (AWS itself)"
    if urlsplit(uri).scheme.lower() in ("gs", "gcs"):
        fix = ("GCS: set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file on every node (or run "
               "with a GCP service account), check the bucket name, and that storage.googleapis.com is reachable")
    elif any(s in text for s in ("CURLCODE: 7", "COULD NOT CONNECT", "CONNECTION REFUSED", "COULDN'T CONNECT",
                               "COULD NOT RESOLVE", "CURLCODE: 6", "CURLCODE: 28", "TIMED OUT", "NETWORK_CONNECTION")):
        fix = (f"the storage endpoint cannot be reached from node {socket.gethostname()} ({where}): check "
               f"AWS_ENDPOINT_URL (scheme, host, port) and that the server is up and reachable from every node")
    elif any(s in text for s in ("NO_SUCH_BUCKET", "NOSUCHBUCKET", "BUCKET DOES NOT EXIST")):
        fix = (f"the bucket {urlsplit(uri).netloc!r} does not exist at {where}: create it, or fix the bucket "
               f"name in the storage URI")
    elif any(s in text for s in ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "ACCESS_DENIED",
                                 "INVALIDACCESSKEYID", "SIGNATUREDOESNOTMATCH", "ACCESSDENIED", "FORBIDDEN")):
        fix = ("the credentials were refused: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
               "AWS_SESSION_TOKEN for temporary credentials) to a key allowed to use this bucket, on every node")
    elif "INTERNAL_FAILURE" in text and not os.environ.get("AWS_ACCESS_KEY_ID"):
        fix = ("no credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in "
               "the environment of every node")
    elif any(s in text for s in ("PERMANENTREDIRECT", "PERMANENT_REDIRECT", "AUTHORIZATIONHEADERMALFORMED")):
        fix = "the bucket lives in another region: set AWS_REGION to the bucket's region"
    else:
        fix = "see the backend's message above"
    return f"cannot {op} storage {uri}: {message.strip() or '(no message)'}\n  likely fix: {fix}"
