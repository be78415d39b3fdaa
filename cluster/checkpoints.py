"""Where a run keeps its checkpoints and how a resume finds one; the data cursor a checkpoint carries.

A checkpoint is `<run dir>/checkpoints/step_<N>/`, written by the learner ranks (learner.checkpoint);
its `trainer_state.json` is written last, so a folder without one is a checkpoint a kill cut short
and is never resumed from. Imports no ray: the job checks `run.resume_from` before Ray starts.
"""

from __future__ import annotations

import json
import shlex
import signal
import time
from pathlib import Path

from core.config import Config

STATE = "trainer_state.json"


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


def run_dir_for(cfg: Config) -> Path:
    """`<output_dir>/<name>-<date>-<time>`, made unique if two runs start in the same second."""
    base = Path(cfg.run.output_dir) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def is_complete(ckpt: Path) -> bool:
    # trainer_state.json is written last, after every rank's files (LearnerWorker.save)
    return (ckpt / STATE).is_file()


def _newest_checkpoint(run_dir: Path) -> Path | None:
    steps = sorted((p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and is_complete(p)),
                   key=lambda p: p.name)
    return steps[-1] if steps else None


def resolve_checkpoint(cfg: Config) -> Path:
    """The checkpoint `run.resume_from` names: a checkpoint folder, a run folder (its newest complete
    checkpoint) or `latest` (the newest complete checkpoint of the newest `<output_dir>/<run.name>-*`
    run folder that has one). A checkpoint that a kill cut short is never picked."""
    ref = cfg.run.resume_from
    if ref == "latest":
        runs = sorted(Path(cfg.run.output_dir).glob(f"{cfg.run.name}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
        for run in runs:
            if (found := _newest_checkpoint(run)) is not None:
                return found
        raise FileNotFoundError(f"run.resume_from=latest: no complete checkpoint in {cfg.run.output_dir}/"
                                f"{cfg.run.name}-*/checkpoints")
    path = Path(ref)
    if is_complete(path):
        return path
    if (path / "checkpoints").is_dir() and (found := _newest_checkpoint(path)) is not None:
        return found
    raise FileNotFoundError(f"run.resume_from={ref}: not a complete checkpoint (no {STATE}) nor a run "
                            "folder with one")


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint was written after (`client_state.step` of its trainer_state.json); a
    ValueError naming the file when it has none."""
    path = ckpt / STATE
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}): not a checkpoint this job wrote") from None
    client = state.get("client_state") if isinstance(state, dict) else None
    step = client.get("step") if isinstance(client, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{path} has no step (client_state.step is {step!r}): not a checkpoint of "
                         "`python -m cluster.train`, which saves the step and the data cursor with the weights")
    return step


def resume_line(checkpoint: Path | None, command: list[str] | None = None) -> str:
    """How to go on from `checkpoint`: `command` (the job's own command line) with run.resume_from set."""
    if checkpoint is None:
        return "no checkpoint was written yet (run.save_every sets how often): run the job again to start over"
    return (f"resume with: {shlex.join([*(command or []), f'run.resume_from={checkpoint}'])}"
            "  (run.resume_from=latest works too)")


class JobStopped(RuntimeError):
    """The job cannot go on (a learner rank died); the message says which checkpoint to resume from."""

    def __init__(self, reason: str, checkpoint: Path | None):
        self.checkpoint = checkpoint
        super().__init__(f"{reason}. {resume_line(checkpoint)}")


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the job: at a step boundary (`step` is the last step run, checkpointed), or at
    once on a second signal (`step` None); `checkpoint` is the newest complete one of the run, if any."""

    def __init__(self, signum: int, checkpoint: Path | None, step: int | None = None):
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
