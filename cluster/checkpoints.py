"""Where a run keeps its checkpoints and how a resume finds one; the data cursor a checkpoint carries.

A checkpoint is `<run dir>/checkpoints/step_<N>/` in storage (a local path or a URI, core.storage),
written there by the learner ranks themselves (learner.checkpoint); its `trainer_state.json` is
written last, so a folder without one is a checkpoint a kill cut short and is never resumed from.
What is complete is decided by reading storage, never the driver's own disk. Imports no ray: the job
checks `run.resume_from` before Ray starts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import time

from core.config import Config
from core.storage import Storage

STATE = "trainer_state.json"
CHECKPOINTS = "checkpoints"


class Cursor:
    """Batches of prompt indices: a seeded shuffle per epoch; its state resumes exactly."""

    def __init__(self, n: int, batch: int, seed: int, shuffle: bool, state: dict | None = None):
        self.n, self.batch, self.seed, self.shuffle = n, batch, seed, shuffle
        self.epoch, self.pos = (state["epoch"], state["pos"]) if state else (0, 0)

    def _order(self) -> list[int]:
        import numpy as np

        order = np.arange(self.n)
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        return order.tolist()

    def next(self) -> list[int]:
        out: list[int] = []
        while len(out) < min(self.batch, self.n):
            order = self._order()
            take = order[self.pos:self.pos + self.batch - len(out)]
            out.extend(take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


def run_dir_for(cfg: Config) -> Storage:
    """`<output_dir>/<name>-<date>-<time>` in storage, made unique (`-2`, `-3`, ...) if two runs start in
    the same second: storage is asked, not the driver's disk."""
    out = Storage(cfg.run.output_dir)
    base = f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, k = base, 1
    while out.exists(name):
        k += 1
        name = f"{base}-{k}"
    return out.join(name)


def checkpoint_path(run_dir: Storage, step: int) -> Storage:
    return run_dir.join(CHECKPOINTS, f"step_{step:06d}")


def parent(s: Storage) -> Storage:
    """The folder holding `s` (for a checkpoint's `checkpoints/` and run folder)."""
    if s.is_local:
        return Storage(os.path.dirname(s.uri) or "/")
    head = s.uri.rstrip("/").rsplit("/", 1)[0]
    return Storage(s.uri if head.endswith(":/") else head)  # a bucket has no parent


def is_complete(ckpt: Storage) -> bool:
    # trainer_state.json is written last, after every rank's files are in storage (learner.checkpoint)
    return ckpt.exists(STATE)


def _newest_checkpoint(run_dir: Storage) -> Storage | None:
    for name in sorted((n for n in run_dir.list(CHECKPOINTS) if n.startswith("step_")), reverse=True):
        if is_complete(ckpt := run_dir.join(CHECKPOINTS, name)):
            return ckpt
    return None


def _runs_newest_first(cfg: Config) -> list[Storage]:
    """The run folders `<output_dir>/<run.name>-<date>-<time>[-k]`, newest first by name (object stores
    have no folder times; the name holds the start time, and `-k` the order within one second)."""
    pattern = re.compile(rf"{re.escape(cfg.run.name)}-(\d{{8}}-\d{{6}})(?:-(\d+))?")
    out = Storage(cfg.run.output_dir)
    found = [(m.group(1), int(m.group(2) or 1), name) for name in out.list() if (m := pattern.fullmatch(name))]
    return [out.join(name) for *_, name in sorted(found, reverse=True)]


def resolve_checkpoint(cfg: Config) -> Storage:
    """The checkpoint `run.resume_from` names (a local path or a URI): a checkpoint folder, a run folder
    (its newest complete checkpoint) or `latest` (the newest complete checkpoint of the newest
    `<output_dir>/<run.name>-*` run folder that has one). Completeness is read from storage; a checkpoint
    that a kill cut short is never picked."""
    ref = cfg.run.resume_from
    if ref == "latest":
        for run in _runs_newest_first(cfg):
            if (found := _newest_checkpoint(run)) is not None:
                return found
        raise FileNotFoundError(f"run.resume_from=latest: no complete checkpoint in "
                                f"{Storage(cfg.run.output_dir).uri}/{cfg.run.name}-*/{CHECKPOINTS}")
    path = Storage(ref)
    if is_complete(path):
        return path
    if (found := _newest_checkpoint(path)) is not None:
        return found
    raise FileNotFoundError(f"run.resume_from={ref}: not a complete checkpoint (no {STATE}) nor a run "
                            f"folder with one (looked in {path.uri})")


def checkpoint_step(ckpt: Storage) -> int:
    """The step a checkpoint was written after (`client_state.step` of its trainer_state.json, read from
    storage); a ValueError naming the file when it has none."""
    where = ckpt.join(STATE).uri
    try:
        state = json.loads(ckpt.read_text(STATE))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e}): not a checkpoint this job wrote") from None
    client = state.get("client_state") if isinstance(state, dict) else None
    step = client.get("step") if isinstance(client, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{where} has no step (client_state.step is {step!r}): not a checkpoint of "
                         "`python -m cluster.train`, which saves the step and the data cursor with the weights")
    return step


def _show(checkpoint: Storage | str | os.PathLike) -> str:
    return checkpoint.uri if isinstance(checkpoint, Storage) else str(checkpoint)


def resume_line(checkpoint: Storage | str | os.PathLike | None, command: list[str] | None = None) -> str:
    """How to go on from `checkpoint` (its URI): `command` (the job's own command line) with
    run.resume_from set."""
    if checkpoint is None:
        return "no checkpoint was written yet (run.save_every sets how often): run the job again to start over"
    return (f"resume with: {shlex.join([*(command or []), f'run.resume_from={_show(checkpoint)}'])}"
            "  (run.resume_from=latest works too)")


class JobStopped(RuntimeError):
    """The job cannot go on (a learner rank died); the message says which checkpoint to resume from."""

    def __init__(self, reason: str, checkpoint: str | None):
        self.checkpoint = checkpoint  # its URI
        super().__init__(f"{reason}. {resume_line(checkpoint)}")


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the job: at a step boundary (`step` is the last step run, checkpointed), or at
    once on a second signal (`step` None); `checkpoint` is the URI of the run's newest complete one, if any."""

    def __init__(self, signum: int, checkpoint: str | None, step: int | None = None):
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        self.exit_code = 128 + signum  # what a shell reports for a process the signal killed: 130, 143
        super().__init__(self.message())

    def message(self, command: list[str] | None = None) -> str:
        name = signal.Signals(self.signum).name
        if self.step is None:
            how = f"stopped at once by a second {name}"
        else:
            how = f"stopped by {name} " + (f"after step {self.step}" if self.step else "before the first step")
        where = f"; checkpoint {self.checkpoint}" if self.checkpoint is not None else ""
        return f"{how}{where}; {resume_line(self.checkpoint, command)}"
