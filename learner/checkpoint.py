"""Checkpoints of the learner group: save and resume every rank's model, optimizer, scheduler, step and RNG.

Layout of a checkpoint folder: `hf/` a Hugging Face folder of the policy (safetensors), `dcp/` the
sharded model + optimizer (torch.distributed.checkpoint, one file per rank), `rng/rank{r}.pt` each
rank's generators, and `trainer_state.json` (step, scheduler, world size, the caller's client state),
written last: its presence marks a complete checkpoint.

The folder is a local path or a storage URI (core.storage). A local path is written in place, as one
node (or a shared mount) sees it. For a URI every rank writes what it owns (its DCP shard, rank 0 also
DCP's `.metadata` and `hf/`, its own RNG file) into a node-local staging folder and uploads exactly
those files: no rank needs another's disk. Loading downloads `dcp/` and the rank's own RNG file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from core.node_cache import default_cache_root
from core.storage import Storage
from learner.weight_export import write_hf_folder

if TYPE_CHECKING:
    from learner.worker import LearnerWorker

STATE = "trainer_state.json"


def check_storage_visible(uri: str, token: str) -> None:
    """A StorageError naming the fix unless this process reads the marker the driver wrote at `uri`
    (core.storage.Storage.write_marker): a run folder only the driver's node can see fails here, at
    start, not at the first checkpoint."""
    Storage(uri).check_visible(token)


@contextmanager
def _staging(rank: int) -> Iterator[Path]:
    """A node-local folder of this rank and call (two ranks on one node never share one), removed after."""
    root = default_cache_root() / "staging"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"ckpt-rank{rank}-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_own_files(worker: LearnerWorker, out: Path) -> None:
    """This rank's part of a checkpoint under `out` (a collective: DCP and the weight export)."""
    model_sd, optim_sd = get_state_dict(worker.model, worker.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "dcp"))
    full = worker.export_weights()  # through the worker: it records the fingerprint of what was saved
    (out / "rng").mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state(), "generator": worker.generator.get_state()}
    if worker.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(worker.device)
    torch.save(rng, out / "rng" / f"rank{worker.rank}.pt")
    if worker.rank == 0:
        on_cpu = worker.device.type == "cpu"
        # tokenizer and processor files come from the policy folder on this rank's node
        write_hf_folder(out / "hf", worker.model_path, worker.model.policy.config,
                        {k: v.to(torch.float32) if on_cpu else v for k, v in full.items()})


def save_checkpoint(worker: LearnerWorker, path: str, client_state: dict | None) -> None:
    """Write `worker`'s rank of a checkpoint to `path`, a local folder or a storage URI (a collective:
    every rank calls it). trainer_state.json goes last, by rank 0, once every rank's files are in."""
    target = Storage(path)
    if worker.rank == 0:
        # a checkpoint of the same step written before (a resume from an older one) is incomplete from
        # here on; DCP's first collective keeps the other ranks from writing before this
        target.delete(STATE)
    if target.is_local:
        _write_own_files(worker, Path(target.uri))
    else:
        with _staging(worker.rank) as local:
            _write_own_files(worker, local)
            target.upload(local)
    dist.barrier()  # every rank's files are in before the marker
    if worker.rank == 0:
        state = {"step": worker.step, "scheduler": worker.scheduler.state_dict(), "world_size": worker.world,
                 "client_state": client_state or {}}
        target.write_text(STATE, json.dumps(state, indent=2, default=float))  # atomic on every backend
    dist.barrier()


def load_checkpoint(worker: LearnerWorker, path: str) -> tuple[int, dict]:
    """Restore `worker`'s model, optimizer, scheduler and RNG in place from `save_checkpoint(path)` (a
    local folder or a storage URI); returns (step, client state)."""
    src = Storage(path)
    try:
        state = json.loads(src.read_text(STATE))
    except FileNotFoundError:
        raise FileNotFoundError(f"{src.uri}: no {STATE} (not a checkpoint, or an incomplete one)") from None
    if src.is_local:
        _load_from(worker, Path(src.uri), state)
        return int(state["step"]), state["client_state"]
    with _staging(worker.rank) as local:
        src.download(local / "dcp", "dcp")
        rng = f"rng/rank{worker.rank}.pt"
        if src.exists(rng):
            (local / "rng").mkdir()
            (local / rng).write_bytes(src.read_bytes(rng))
        _load_from(worker, local, state)
    return int(state["step"]), state["client_state"]


def _load_from(worker: LearnerWorker, src: Path, state: dict) -> None:
    model_sd, optim_sd = get_state_dict(worker.model, worker.optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(src / "dcp"))
    set_state_dict(worker.model, worker.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    worker.scheduler.load_state_dict(state["scheduler"])
    rng_file = src / "rng" / f"rank{worker.rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        worker.generator.set_state(rng["generator"])
        if "cuda" in rng and worker.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], worker.device)
