"""The driver's side of a run folder in storage: the files the driver owns (config.yaml, metrics.jsonl,
TensorBoard events, plots, summary.json) are written into a local folder and uploaded to the run's
storage folder; checkpoints are written there by the learner ranks themselves (learner.checkpoint).

When the storage is a local path, the local folder IS the run folder and nothing is copied. Otherwise
the local folder is a staging folder under the node cache (`default_cache_root()/runs/`), and `sync`
uploads the files that changed (by size and mtime) since the last upload. A resumed run first gets
the run folder's files (all but checkpoints/) back into staging, so the metrics file grows and is
truncated there exactly as on a local run.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

from core.node_cache import default_cache_root
from core.storage import Storage

log = logging.getLogger("cluster.train")

CHECKPOINTS = "checkpoints"


class RunFolder:
    """`storage`: the run folder in storage; `local`: where the driver writes its files."""

    def __init__(self, storage: Storage, sync_every_s: float = 30.0, resume: bool = False,
                 cache_root: Path | None = None):
        self.storage = storage
        self.sync_every_s = float(sync_every_s)
        self.name = storage.uri.rstrip("/").rsplit("/", 1)[-1]
        self._sent: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) of what storage holds
        self._last_sync = time.monotonic()
        self.token: str | None = None  # the storage marker's token (Storage.write_marker), once written
        if storage.is_local:
            self.local = Path(storage.uri)
            self.local.mkdir(parents=True, exist_ok=True)
            return
        # One staging folder per storage URI: two runs of the same name in two buckets do not share it.
        tag = hashlib.sha256(storage.uri.encode()).hexdigest()[:8]
        self.local = Path(cache_root or default_cache_root()) / "runs" / f"{self.name}-{tag}"
        if self.local.exists():  # left by an earlier process on this node: storage is what counts
            shutil.rmtree(self.local)
        self.local.mkdir(parents=True)
        if resume:
            self._download()

    def __repr__(self) -> str:
        return f"RunFolder({self.storage.uri!r}, local={str(self.local)!r})"

    @property
    def uri(self) -> str:
        return self.storage.uri

    def _download(self) -> None:
        """The run folder's files except checkpoints/ into staging, recorded as already in storage."""
        for rel in self.storage.list_files():
            if rel.split("/", 1)[0] == CHECKPOINTS or rel.startswith(".saei_"):
                continue
            path = self.local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.storage.read_bytes(rel))
            st = path.stat()
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
        log.info("run folder %s: %d files back in %s", self.uri, len(self._sent), self.local)

    def sync(self, force: bool = False) -> list[str]:
        """Upload the local files that changed since the last upload; returns their relative paths.
        Without `force`, does nothing until `sync_every_s` seconds have passed since the last sync.
        A no-op when the storage is local (the files are already there)."""
        if self.storage.is_local:
            return []
        if not force and time.monotonic() - self._last_sync < self.sync_every_s:
            return []
        sent = []
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = path.relative_to(self.local).as_posix()
            st = path.stat()  # before reading: a file appended meanwhile differs next time and goes again
            if self._sent.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            self.storage.write_bytes(rel, path.read_bytes())
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
            sent.append(rel)
        self._last_sync = time.monotonic()
        return sent

    def sync_quietly(self) -> None:
        """`sync(force=True)` on the way out of a failed job: an upload error is logged, not raised, so
        that the job's own error stays the one the user sees."""
        try:
            self.sync(force=True)
        except OSError as e:
            log.error("could not upload the run's files to %s: %s", self.uri, e)
