"""A node-local, content-addressed cache of folders (policies, processors, datasets).

Inputs reach a node through storage or Ray's object store, never through a path that only exists on the
driver (../shared/DESIGN.md, "On a cluster"). Every process on a node that needs folder `digest` asks
this cache: the first one downloads it (into a temp folder, then one atomic rename), the others wait on
the digest's lock file and reuse it. Entries are evicted least-recently-used when the cache is over
`max_bytes`. The tar helpers carry a folder through the object store when the driver built it locally.

`PolicyFolder` is how the driver hands the policy/processor folder to every role (a storage URI, a
folder packed into Ray's object store, or a plain path every node sees); its `local()` gives the folder
on the node that runs it.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import shutil
import socket
import tarfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from core.storage import Storage, StorageError

DEFAULT_MAX_BYTES = 50 * 1024**3
_DIGEST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_BLOCK = 1024 * 1024


def default_cache_root() -> Path:
    """$SAEI_CACHE_DIR, else ~/.cache/saei."""
    return Path(os.environ.get("SAEI_CACHE_DIR") or Path.home() / ".cache" / "saei")


class NodeCache:
    """Folders by digest under `root/entries/<digest>`; `root/locks` and `root/tmp` beside them.

    An entry folder exists only complete (it appears by rename), so its presence is the "done" flag.
    Eviction removes whole entries, oldest use first, never the one being returned; a process still
    reading an evicted entry's open files is unaffected (Linux), but set `max_bytes` above the node's
    working set so that live entries are not evicted under a reader.
    """

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root).expanduser().resolve() if root is not None else default_cache_root()
        self.max_bytes = int(max_bytes)
        self.entries, self.locks, self.tmp = self.root / "entries", self.root / "locks", self.root / "tmp"
        for d in (self.entries, self.locks, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        # What this process did, for logs and tests: downloads/unpacks it ran, hits it served.
        self.stats = {"hits": 0, "fills": 0, "evicted": 0}

    def path(self, digest: str) -> Path:
        return self.entries / _check_digest(digest)

    def get(self, digest: str) -> Path | None:
        """The entry's folder when cached (marking it used), else None."""
        path = self.path(digest)
        if not path.is_dir():
            return None
        _touch(path)
        self.stats["hits"] += 1
        return path

    def fetch_tree(self, storage: Storage | str, digest: str, verify: bool = False) -> Path:
        """A local folder holding the files of storage folder `storage`, downloaded once per digest on
        this node. `verify`: check that the download's `tree_digest` equals `digest` (StorageError when
        not: the storage folder changed under a digest that names other content)."""
        src = storage if isinstance(storage, Storage) else Storage(storage)
        return self._materialize(digest, lambda dest: src.download(dest), verify, f"storage {src.uri}")

    def put_bytes(self, digest: str, data: bytes, verify: bool = True) -> Path:
        """The entry for a `pack_tree` tarball (e.g. one that came through Ray's object store), unpacked
        once per digest on this node."""
        return self._materialize(digest, lambda dest: unpack_tree(data, dest), verify, "a packed tree")

    def _materialize(self, digest: str, fill: Callable[[Path], object], verify: bool, what: str) -> Path:
        hit = self.get(digest)
        if hit is not None:
            return hit
        path = self.path(digest)
        with self._lock(digest):
            hit = self.get(digest)  # another process filled it while this one waited for the lock
            if hit is not None:
                return hit
            staging = self.tmp / f"{digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            try:
                staging.mkdir(parents=True)
                fill(staging)
                if verify and (got := tree_digest(staging)) != digest:
                    raise StorageError(f"{what}: content digest {got} differs from the expected {digest}")
                os.rename(staging, path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            _touch(path)
            self.stats["fills"] += 1
        self.evict(keep=digest)
        return path

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least-recently-used entries until the cache fits `max_bytes` (never `keep`, never
        an entry another process is filling or removing); returns the evicted digests."""
        with self._lock(".evict"):
            sized = []
            for entry in self.entries.iterdir():
                try:
                    sized.append((entry.stat().st_mtime, entry.name, _folder_bytes(entry)))
                except FileNotFoundError:
                    continue
            total = sum(size for _, _, size in sized)
            evicted = []
            for _, name, size in sorted(sized):
                if total <= self.max_bytes:
                    break
                if name == keep or not self._remove(name):
                    continue
                total -= size
                evicted.append(name)
        self.stats["evicted"] += len(evicted)
        return evicted

    def _remove(self, digest: str) -> bool:
        with self._lock(digest, blocking=False) as held:
            if not held:
                return False
            # Rename first so that no reader ever finds a half-deleted entry under the digest's name.
            trash = self.tmp / f"evict.{digest}.{uuid.uuid4().hex[:8]}"
            os.rename(self.entries / digest, trash)
            shutil.rmtree(trash, ignore_errors=True)
            return True

    @contextmanager
    def _lock(self, name: str, blocking: bool = True) -> Iterator[bool]:
        """An exclusive flock on `locks/<name>.lock` (per open file, so also between threads)."""
        with open(self.locks / f"{name}.lock", "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"cache digest {digest!r}: use letters, digits, '_', '.', '-' (no '/', at most 128)")
    return digest


def _touch(path: Path) -> None:
    # The folder's mtime is its last use (nothing writes inside a complete entry).
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _files(folder: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under `folder`, symlinks followed, sorted."""
    folder = Path(folder)
    out = [(p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file()]
    return sorted(out)


def tree_digest(folder: str | os.PathLike) -> str:
    """sha256 over the sorted relative paths, sizes and contents of a folder's files (symlinks followed,
    empty folders ignored, timestamps and permissions ignored): equal folders, equal digests."""
    h = hashlib.sha256()
    for rel, path in _files(Path(folder)):
        name = rel.encode("utf-8")
        h.update(len(name).to_bytes(8, "little") + name + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
    return h.hexdigest()


def pack_tree(folder: str | os.PathLike) -> bytes:
    """An uncompressed tar of a folder's regular files (symlinks followed: the content travels, not the
    link), with fixed owners and times so that equal folders pack to equal bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in _files(Path(folder)):
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return buf.getvalue()


def unpack_tree(data: bytes, dest: str | os.PathLike) -> Path:
    """Unpack a tar into `dest`, refusing (ValueError, before anything is written) a member that would
    land outside it: an absolute name, a '..' component, a link whose target leaves `dest`, a device."""
    dest = Path(dest).resolve()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        for m in members:
            _check_member(m, dest)
        dest.mkdir(parents=True, exist_ok=True)
        tar.extractall(dest, members=members, filter="data")
    return dest


def _check_member(m: tarfile.TarInfo, dest: Path) -> None:
    name = PurePosixPath(m.name)
    if name.is_absolute() or ".." in name.parts or m.name.startswith(("/", "\\")):
        raise ValueError(f"unsafe tar member {m.name!r}: absolute or '..' path")
    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        raise ValueError(f"unsafe tar member {m.name!r}: not a file, folder or link")
    if m.issym() or m.islnk():
        link = PurePosixPath(m.linkname)
        # A symlink's target is relative to its own folder; a hard link's to the archive root.
        base = (dest / name.parent) if m.issym() else dest
        target = Path(os.path.normpath(base / link)) if not link.is_absolute() else Path(link)
        if link.is_absolute() or not target.is_relative_to(dest):
            raise ValueError(f"unsafe tar member {m.name!r}: link to {m.linkname!r} leaves the folder")


# ---- the policy folder on every node -------------------------------------------------------------
DEFAULT_SHIP_MAX_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class PolicyFolder:
    """The policy/processor folder as the driver hands it to every role; `local()` gives a folder on the
    node it runs on. Small and picklable: Ray sends it to every actor (an ObjectRef nested in an actor
    argument arrives unresolved, so only a node that needs the bytes fetches them).

    Three forms, made by `policy_folder` on the driver:
    - a storage URI (`s3://`, `gs://`, `file://`, ...): each node downloads it once into its NodeCache;
    - a local folder the driver packed into Ray's object store (`packed`): each node unpacks it once;
    - a plain local path (a folder too big to ship): every node must see it at that path itself.
    """

    source: str
    """The driver's local path or a storage URI."""
    digest: str | None = None
    """NodeCache key: `tree_digest` of a packed folder, `listing_digest` of a URI (None: a plain path,
    or a URI whose listing is read when `local` runs)."""
    packed: object = None
    """A Ray ObjectRef of `pack_tree(source)` bytes (opaque here: core imports no ray), or None."""

    @property
    def is_uri(self) -> bool:
        return "://" in self.source

    def local(self, get: Callable[[object], bytes] | None = None, cache: NodeCache | None = None,
              where: str | None = None) -> str:
        """A folder on this node holding the policy. `get` resolves `packed` (the Ray shells pass
        ray.get); `where` names this node in errors (default: its hostname)."""
        if self.is_uri:
            storage = Storage(self.source)
            if self.digest is None:  # not checked by `policy_folder` on the driver yet
                _check_policy_uri(storage, self.source)
            cache = cache or NodeCache()
            return str(cache.fetch_tree(storage, self.digest or listing_digest(storage)))
        if self.packed is not None:
            cache = cache or NodeCache()
            hit = cache.get(self.digest)
            if hit is not None:
                return str(hit)
            if get is None:
                raise ValueError(f"the policy folder {self.source} came through Ray's object store: pass get=ray.get")
            return str(cache.put_bytes(self.digest, get(self.packed)))
        if (Path(self.source) / "config.json").is_file():
            return self.source
        node = where or socket.gethostname()
        raise FileNotFoundError(f"model.path {self.source}: no config.json at that path on node {node}. Only the "
                                "driver's node may have it: give a storage URI (s3://..., gs://...) or a path "
                                "that every node sees (a shared mount), or lower the folder below "
                                "model.ship_max_gb so that the driver ships it through Ray's object store")


def node_local(policy: str | os.PathLike | PolicyFolder, get: Callable[[object], bytes] | None = None,
               where: str | None = None) -> str:
    """The policy folder on this node, for a PolicyFolder or a plain path (checked: config.json there)."""
    folder = policy if isinstance(policy, PolicyFolder) else PolicyFolder(str(policy))
    return folder.local(get=get, where=where)


def listing_digest(storage: Storage) -> str:
    """sha256 over the relative names, sizes and modification times of a storage folder's files: the
    cache key of a URI, cheap to compute on the driver (hashing the content would download it)."""
    fs, base = storage._fs()  # noqa: SLF001 (one module family: core owns Storage)
    with storage._errors("list", base):  # noqa: SLF001
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
    root = base.rstrip("/") + "/"
    h = hashlib.sha256(storage.uri.encode("utf-8"))
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        mtime = info.mtime_ns if info.mtime_ns is not None else -1
        h.update(f"\0{info.path[len(root):]}\0{info.size}\0{mtime}".encode())
    return h.hexdigest()


def policy_folder(path_or_uri: str | os.PathLike, put: Callable[[bytes], object] | None = None,
                  ship_max_bytes: int = DEFAULT_SHIP_MAX_BYTES) -> PolicyFolder:
    """Driver side, after Ray starts: how every node gets the policy at `path_or_uri`. A URI is fetched
    by each node from storage; a local folder of at most `ship_max_bytes` is packed once into Ray's
    object store with `put` (ray.put); a bigger one, or any folder without `put`, stays a plain path
    that every node must see."""
    source = str(path_or_uri)
    if "://" in source:
        storage = Storage(source)
        _check_policy_uri(storage, source)
        return PolicyFolder(source, listing_digest(storage))
    folder = Path(source).expanduser().resolve()
    if put is None or _folder_bytes(folder) > ship_max_bytes:
        return PolicyFolder(str(folder))
    return PolicyFolder(str(folder), tree_digest(folder), put(pack_tree(folder)))


def _check_policy_uri(storage: Storage, uri: str) -> None:
    if storage.size("config.json") is None:
        raise FileNotFoundError(f"model.path {uri}: no config.json there; a policy URI must name a Hugging Face "
                                "folder (config.json, the weights, the tokenizer and processor files)")
