"""A node-local, content-addressed cache of folders (policies, processors, datasets).

Inputs reach a node through storage or Ray's object store, never through a path that only exists on the
driver (../shared/DESIGN.md, "On a cluster"). Every process on a node that needs folder `digest` asks
this cache: the first one downloads it (into a temp folder, then one atomic rename), the others wait on
the digest's lock file and reuse it. Entries are evicted least-recently-used when the cache is over
`max_bytes`. The tar helpers carry a folder through the object store when the driver built it locally.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

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
