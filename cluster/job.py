"""The running job: its roles on Ray, resume, the step loop, checkpoints, and the stop on a signal.

`cluster.train` checks the input and opens the run folder; a `Job` then starts the roles (learner
group, rollout pool, adversary, the ops controller, the metrics sink), resumes, runs the steps and
finishes. SIGINT (Ctrl-C) and SIGTERM (`ray job stop`, preemption) set a flag (`StopFlag`) that the
loop reads at each step boundary: the job writes a checkpoint there (or names the one the step just
wrote), shuts its actors down and raises `Interrupted` (exit 130 / 143). A second signal stops at once.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from typing import TYPE_CHECKING

import ray
from tqdm import tqdm

from actors.pool import RolloutPool
from adversary.actor import create_adversary_actor
from cluster.checkpoints import Cursor, Interrupted, JobStopped, checkpoint_path
from cluster.metrics import MetricsSink, plot_curves
from cluster.ops import start_controller
from cluster.pipeline import Parts, evaluate, saei_step
from core.node_cache import policy_folder
from core.resources import PlacementTimeout
from learner.group import LearnerGroup, LearnerRankDied

if TYPE_CHECKING:
    from cluster.run_folder import RunFolder
    from cluster.train import Inputs

log = logging.getLogger("cluster.train")


class StopFlag:
    """SIGINT / SIGTERM handlers of the driver: the first signal asks for a stop at the next step boundary,
    a second raises KeyboardInterrupt wherever the driver is (stop at once)."""

    def __init__(self):
        self.signum: int | None = None  # the last signal received

    def install(self) -> None:
        """Main thread only, and after ray.init (which sets a SIGTERM handler of its own)."""
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:
        first, self.signum = self.signum is None, signum
        if not first:
            raise KeyboardInterrupt
        log.warning("%s: the job stops after this step and writes a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None


def resume_learner(parts: Parts, ckpt: str) -> dict:
    """Load every learner rank from `ckpt` and bring the rollout pool and the adversary to its weights
    through the step's own weight sync (`cluster.weight_sync`: a broadcast when configured); returns
    the client state saved with the checkpoint (step, data cursor)."""
    client = parts.learner.load(ckpt)  # a local path or a storage URI: each rank reads storage itself
    parts.weights.sync()
    return client


class Job:
    """The roles of one run and what the loop keeps between steps."""

    def __init__(self, cfg, inputs: Inputs, run: RunFolder):
        self.cfg, self.inputs, self.folder = cfg, inputs, run
        self.run_dir = run.local  # where the driver writes its files (uploaded to folder.storage by folder.sync)
        self.controller = start_controller(cfg.cluster.namespace, run.name, cfg.cluster.rollout_workers)
        # every node gets the policy from its URI or from Ray's object store, never from the driver's disk
        policy = policy_folder(inputs.model_path, put=ray.put, ship_max_bytes=int(cfg.model.ship_max_gb * 2**30))
        learner = LearnerGroup(policy, cfg)
        learner.check_storage(run.storage.uri, run.token)  # Ray Train's marker: the run folder is seen by every rank
        pool = RolloutPool(policy, cfg)
        adversary = create_adversary_actor(policy, cfg) if cfg.rollout.n_adv > 0 else None
        self.parts = Parts(cfg=cfg, pool=pool, learner=learner, adversary=adversary)
        self.sink = MetricsSink(run.local, cfg.logging, run_name=run.name, resume_after=inputs.resume_step)
        self.cursor = Cursor(len(inputs.train_prompts), cfg.data.batch_size, cfg.run.seed, cfg.data.shuffle)
        # the URI of the newest complete checkpoint of this run
        self.last_checkpoint: str | None = inputs.resume.uri if inputs.resume is not None else None
        self.saved_step: int | None = inputs.resume_step  # its step
        self.last: dict = {}  # the last step's metrics
        self.evals: dict = {}  # the last evaluation's
        self.baseline: dict = {}  # the evaluation before the first step

    def resume(self) -> int:
        """Restore the learner, the engines' weights and the data cursor; returns the first step to run."""
        if self.inputs.resume is None:
            return 1
        try:
            client = resume_learner(self.parts, self.last_checkpoint)
        except LearnerRankDied as err:  # the same stop as in a step: one line naming the rank and the checkpoint
            raise JobStopped(f"{err}; the job stops (an FSDP group cannot lose a rank)", self.last_checkpoint) from err
        cfg = self.cfg
        self.cursor = Cursor(len(self.inputs.train_prompts), cfg.data.batch_size, cfg.run.seed, cfg.data.shuffle,
                             client.get("cursor"))
        log.info("resumed from %s at step %d", self.last_checkpoint, self.inputs.resume_step + 1)
        return self.inputs.resume_step + 1

    def checkpoint(self, step: int) -> str:
        """Every learner rank writes its part to storage (learner.checkpoint); returns the URI. The driver's
        files go up with it, so the run's storage holds the metrics of every step it has weights of."""
        uri = checkpoint_path(self.folder.storage, step).uri
        self.parts.learner.save(uri, {"cursor": self.cursor.state(), "step": step})
        self.last_checkpoint, self.saved_step = uri, step
        self.folder.sync(force=True)
        return uri

    def evaluate(self, step: int) -> None:
        self.evals = evaluate(self.parts.pool, self.cfg, self.inputs.test_prompts, step)
        self.sink.log(step, self.evals)

    def run(self, first_step: int, stop: StopFlag) -> int | None:
        """Steps first_step..run.steps; returns the last step run when `stop` ended the loop early
        (None: every step ran)."""
        cfg = self.cfg
        if cfg.run.eval_before_train and first_step == 1 and not stop.requested:
            self.evaluate(0)
            self.baseline = self.evals
            log.info("before training: greedy accuracy %.3f, pass@%d %.3f", self.evals["eval/accuracy"],
                     cfg.rollout.eval_k, self.evals["eval/pass@k"])
        bar = tqdm(range(first_step, cfg.run.steps + 1), desc=self.folder.name,
                   disable=not cfg.logging.progress_bar, dynamic_ncols=True)
        try:
            for step in bar:
                if stop.requested:  # the step boundary
                    return step - 1
                self._resize()
                prompts = [self.inputs.train_prompts[i] for i in self.cursor.next()]
                metrics = saei_step(self.parts, prompts, step, progress=(step - 1) / max(1, cfg.run.steps - 1))
                self.sink.log(step, metrics)
                self.last = metrics
                self.folder.sync()  # at most every logging.sync_every_s
                if step == cfg.run.steps or (cfg.run.eval_every and step % cfg.run.eval_every == 0):
                    self.evaluate(step)
                if cfg.run.save_every and step % cfg.run.save_every == 0:
                    self.checkpoint(step)
                self._report("running", step)
                bar.set_postfix({"reward": f"{metrics['reward/mean'] or 0:.3f}",
                                 "ent": f"{metrics['entropy/clean'] or 0:.2f}",
                                 "step_s": f"{metrics['time/step_s']:.1f}"})
        except LearnerRankDied as err:
            raise JobStopped(f"{err}; the job stops (an FSDP group cannot lose a rank)", self.last_checkpoint) from err
        except PlacementTimeout as err:  # a dead actor's replacement found no node (actors/placement.py)
            raise JobStopped(f"{err}; the job stops", self.last_checkpoint) from err
        finally:
            bar.close()
        return None

    def _resize(self) -> None:
        wanted = ray.get(self.controller.take_request.remote())
        if wanted and wanted != self.parts.pool.size:
            log.info("resizing the rollout pool %d -> %d", self.parts.pool.size, wanted)
            self.parts.pool.resize(wanted)

    def _report(self, state: str, step: int) -> None:
        shown = {k: v for k, v in {**self.last, **self.evals}.items() if v is not None}
        self.controller.report.remote({"state": state, "step": step, "rollout_workers": self.parts.pool.size,
                                       "metrics": shown})

    def interrupted(self, step: int, signum: int) -> Interrupted:
        """The stop at a step boundary: a checkpoint of `step` (unless the step just wrote one, or no step
        ran), the actors shut down; returns the exception that tells the user how to resume."""
        if step > 0 and self.saved_step != step:
            self.checkpoint(step)
        self._report("interrupted", step)
        self.shutdown()
        self.folder.sync(force=True)  # after the sink closed: its last lines and events are in the files
        return Interrupted(signum, self.last_checkpoint, step)

    def finish(self, t_start: float) -> dict:
        """The final checkpoint, curves and summary.json; shuts the actors down; returns the summary."""
        cfg = self.cfg
        ckpt = self.last_checkpoint if self.saved_step == cfg.run.steps else self.checkpoint(cfg.run.steps)
        self.sink.close()
        plots = plot_curves(self.run_dir / "metrics.jsonl", self.run_dir) if cfg.logging.plots else []
        storage = self.folder.storage
        summary = {
            "run_dir": storage.uri, "steps": cfg.run.steps, "seconds": time.perf_counter() - t_start,
            "checkpoint": ckpt, "policy": f"{ckpt}/hf", "plots": [storage.join(p.name).uri for p in plots],
            "final": {k: v for k, v in {**self.last, **self.evals}.items() if v is not None},
            "before_training": self.baseline,
            "staged_in": None if storage.is_local else str(self.folder.local),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.folder.sync(force=True)
        self._report("finished", cfg.run.steps)
        self.shutdown()
        return summary

    def shutdown(self) -> None:
        self.sink.close()
        self.parts.pool.shutdown()
        self.parts.learner.shutdown()
        if self.parts.adversary is not None:
            ray.kill(self.parts.adversary)
