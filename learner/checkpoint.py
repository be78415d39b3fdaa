"""Checkpoints of the learner group: save and resume every rank's model, optimizer, scheduler, step and RNG.

Layout of a checkpoint folder: `hf/` a Hugging Face folder of the policy (safetensors), `dcp/` the
sharded model + optimizer (torch.distributed.checkpoint, one file per rank), `rng/rank{r}.pt` each
rank's generators, and `trainer_state.json` (step, scheduler, world size, the caller's client state),
written last: its presence marks a complete checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from learner.weight_export import write_hf_folder

if TYPE_CHECKING:
    from learner.worker import LearnerWorker


def save_checkpoint(worker: LearnerWorker, path: str, client_state: dict | None) -> None:
    """Write `worker`'s rank of a checkpoint to `path` (a collective: every rank calls it).

    Multi-node runs need `path` on a file system every node sees (DCP writes one file per rank).
    """
    out = Path(path)
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
        write_hf_folder(out / "hf", worker.model_path, worker.model.policy.config,
                        {k: v.to(torch.float32) if on_cpu else v for k, v in full.items()})
    dist.barrier()  # every rank's files are in before the marker
    if worker.rank == 0:
        state = {"step": worker.step, "scheduler": worker.scheduler.state_dict(), "world_size": worker.world,
                 "client_state": client_state or {}}
        tmp = out / "trainer_state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2, default=float))
        os.replace(tmp, out / "trainer_state.json")
    dist.barrier()


def load_checkpoint(worker: LearnerWorker, path: str) -> tuple[int, dict]:
    """Restore `worker`'s model, optimizer, scheduler and RNG in place from `save_checkpoint(path)`;
    returns (step, client state)."""
    src = Path(path)
    state_file = src / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{src}: no trainer_state.json (not a checkpoint, or an incomplete one)")
    state = json.loads(state_file.read_text())
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
    return int(state["step"]), state["client_state"]
