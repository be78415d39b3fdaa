"""The SaEI-GRPO job: `python -m cluster.train --config configs/<name>.yaml key=value ...`

Joins the Ray cluster named by `cluster.address` or `RAY_ADDRESS` (as under `ray job submit`), or
starts a local one on 127.0.0.1 (dashboard on 127.0.0.1). Builds the synthetic data and the tiny
policy when the config asks for them and they are missing, starts the rollout pool, the adversary
and the learner group, runs `run.steps` steps of cluster.pipeline.saei_step, evaluates before the
first step and every `run.eval_every` steps, checkpoints every `run.save_every` steps and at the
end, writes metrics.jsonl, TensorBoard events, PNG curves and summary.json into the run folder, and
exits 0.
`--help-config` prints every key of the config tree with its documentation.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from core.config import Config, ConfigError, describe, load_config, to_yaml
from core.data import DataError

log = logging.getLogger("cluster.train")


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


def _complete(ckpt: Path) -> bool:
    # trainer_state.json is written last, after every rank's files (LearnerWorker.save)
    return (ckpt / "trainer_state.json").is_file()


def _newest_checkpoint(run_dir: Path) -> Path | None:
    steps = sorted((p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and _complete(p)),
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
    if _complete(path):
        return path
    if (path / "checkpoints").is_dir() and (found := _newest_checkpoint(path)) is not None:
        return found
    raise FileNotFoundError(f"run.resume_from={ref}: not a complete checkpoint (no trainer_state.json) nor a run "
                            "folder with one")


def init_ray(cfg: Config):
    """Join `cluster.address` / RAY_ADDRESS, or start a local cluster bound to 127.0.0.1."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, see STACK-NOTES
    import ray

    c = cfg.cluster
    address = c.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=c.namespace, log_to_driver=True)
        return ray
    # Ray CPUs are logical: the rollout, attack and update phases take turns on the same cores, so
    # the local cluster advertises at least what the actors ask for.
    wanted = c.rollout_cpus * c.rollout_workers + c.adversary_cpus + c.learner_cpus * max(1, cfg.learner.num_workers)
    num_cpus = c.num_cpus or max(os.cpu_count() or 1, math.ceil(wanted))
    kwargs = dict(address="local", num_cpus=num_cpus, namespace=c.namespace, include_dashboard=c.dashboard,
                  _node_ip_address="127.0.0.1",
                  runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    if c.dashboard:
        kwargs["dashboard_host"] = c.dashboard_host
    if c.metrics_export_port:
        kwargs["_metrics_export_port"] = c.metrics_export_port
    ctx = ray.init(**kwargs)
    if c.dashboard and getattr(ctx, "dashboard_url", None):
        log.info("Ray dashboard: http://%s", ctx.dashboard_url)
    return ray


class InputError(ValueError):
    """The job's input (data files, model folder) is unusable; raised before Ray starts."""


class JobStopped(RuntimeError):
    """The job cannot go on (a learner rank died); the message says which checkpoint to resume from."""


def train(cfg: Config) -> dict:
    """The whole job; returns the summary (also written to <run dir>/summary.json)."""
    import ray
    from tqdm import tqdm

    from actors.rollout import RolloutPool
    from adversary.actor import create_adversary_actor
    from cluster.bootstrap import ensure_data, ensure_policy, load_split
    from cluster.metrics import MetricsSink, plot_curves
    from cluster.ops import start_controller
    from cluster.pipeline import Parts, evaluate, saei_step
    from core.policy import load_processor
    from learner.group import LearnerGroup, LearnerRankDied

    t_start = time.perf_counter()
    try:  # everything a user gave is checked here, before Ray starts
        ensure_data(cfg)
        model_path = str(ensure_policy(cfg, progress=cfg.logging.progress_bar))
        processor = load_processor(model_path)
        train_prompts = load_split(cfg, processor, cfg.data.train_files, cfg.data.limit_train)
        test_prompts = load_split(cfg, processor, cfg.data.test_files, cfg.data.limit_test)
        resume = resolve_checkpoint(cfg) if cfg.run.resume_from else None
    except (DataError, FileNotFoundError, ValueError, OSError) as e:
        raise InputError(f"{type(e).__name__}: {e}") from e
    resume_step = None
    if resume is not None:
        resume_step = int(json.loads((resume / "trainer_state.json").read_text())["client_state"]["step"])
    if resume is not None and resume.parent.name == "checkpoints":
        run_dir = resume.parent.parent  # the same run folder: one metrics file, one set of curves
    else:
        run_dir = run_dir_for(cfg)
        run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    log.info("run folder %s", run_dir)
    init_ray(cfg)
    controller = start_controller(cfg.cluster.namespace, run_dir.name, cfg.cluster.rollout_workers)

    learner = LearnerGroup(model_path, cfg)
    pool = RolloutPool(model_path, cfg)
    adversary = create_adversary_actor(model_path, cfg) if cfg.rollout.n_adv > 0 else None
    parts = Parts(cfg=cfg, pool=pool, learner=learner, adversary=adversary)
    sink = MetricsSink(run_dir, cfg.logging, run_name=run_dir.name, resume_after=resume_step)

    cursor_state = None
    first_step = 1
    if resume is not None:
        client = learner.load(str(resume))
        cursor_state, first_step = client.get("cursor"), int(client.get("step", 0)) + 1
        weights = learner.export_weights_ref()
        pool.load_weights(weights)
        pool.expect(pool.version, learner.weights_fingerprint())
        if adversary is not None:
            ray.get(adversary.load_weights.remote(weights, pool.version))
        log.info("resumed from %s at step %d", resume, first_step)
    cursor = Cursor(len(train_prompts), cfg.data.batch_size, cfg.run.seed, cfg.data.shuffle, cursor_state)

    def checkpoint(step: int) -> Path:
        path = run_dir / "checkpoints" / f"step_{step:06d}"
        learner.save(str(path), {"cursor": cursor.state(), "step": step})
        return path

    last: dict = {}
    evals: dict = {}
    ckpt = None
    bar = tqdm(range(first_step, cfg.run.steps + 1), desc=run_dir.name, disable=not cfg.logging.progress_bar,
               dynamic_ncols=True)
    baseline: dict = {}
    if cfg.run.eval_before_train and first_step == 1:
        evals = baseline = evaluate(pool, cfg, test_prompts, 0)
        sink.log(0, evals)
        log.info("before training: greedy accuracy %.3f, pass@%d %.3f", evals["eval/accuracy"], cfg.rollout.eval_k,
                 evals["eval/pass@k"])
    try:
        for step in bar:
            wanted = ray.get(controller.take_request.remote())
            if wanted and wanted != pool.size:
                log.info("resizing the rollout pool %d -> %d", pool.size, wanted)
                pool.resize(wanted)
            prompts = [train_prompts[i] for i in cursor.next()]
            metrics = saei_step(parts, prompts, step, progress=(step - 1) / max(1, cfg.run.steps - 1))
            sink.log(step, metrics)
            last = metrics
            if step == cfg.run.steps or (cfg.run.eval_every and step % cfg.run.eval_every == 0):
                evals = evaluate(pool, cfg, test_prompts, step)
                sink.log(step, evals)
            if cfg.run.save_every and step % cfg.run.save_every == 0:
                ckpt = checkpoint(step)
            controller.report.remote({"state": "running", "step": step, "rollout_workers": pool.size,
                                      "metrics": {k: v for k, v in {**metrics, **evals}.items() if v is not None}})
            bar.set_postfix({"reward": f"{metrics['reward/mean'] or 0:.3f}",
                             "ent": f"{metrics['entropy/clean'] or 0:.2f}", "step_s": f"{metrics['time/step_s']:.1f}"})
    except LearnerRankDied as err:
        bar.close()
        last = ckpt or (resume if resume is not None else None)
        raise JobStopped(f"{err}; the job stops (an FSDP group cannot lose a rank). Resume with "
                         + (f"run.resume_from={last} (or run.resume_from=latest)" if last else
                            "a new run: no checkpoint was written yet (run.save_every sets how often)")) from err
    bar.close()

    if not ckpt or not ckpt.name.endswith(f"{cfg.run.steps:06d}"):
        ckpt = checkpoint(cfg.run.steps)
    sink.close()
    plots = plot_curves(run_dir / "metrics.jsonl", run_dir) if cfg.logging.plots else []
    summary = {
        "run_dir": str(run_dir), "steps": cfg.run.steps, "seconds": time.perf_counter() - t_start,
        "checkpoint": str(ckpt), "policy": str(ckpt / "hf"), "plots": [str(p) for p in plots],
        "final": {k: v for k, v in {**last, **evals}.items() if v is not None},
        "before_training": baseline,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    controller.report.remote({"state": "finished", "step": cfg.run.steps})
    pool.shutdown()
    learner.shutdown()
    if adversary is not None:
        ray.kill(adversary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (overrides the typed defaults)")
    parser.add_argument("--help-config", action="store_true", help="print the config tree with its docs and exit")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (OmegaConf dotlist)")
    args = parser.parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, cfg.logging.level, logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        summary = train(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobStopped as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    final = summary["final"]
    print(f"\nrun folder:  {summary['run_dir']}  ({summary['seconds']:.0f} s, {summary['steps']} steps)")
    print(f"checkpoint:  {summary['checkpoint']}  (Hugging Face folder: {summary['policy']})")
    print(f"plots:       {', '.join(summary['plots']) or 'none'}")
    print(f"metrics:     {summary['run_dir']}/metrics.jsonl, TensorBoard in {summary['run_dir']}/tensorboard")
    shown = ("reward/clean", "reward/adversarial", "entropy/clean", "entropy/adversarial", "eval/accuracy",
             "eval/pass@k")
    before = summary["before_training"]
    if before:
        print("before:      " + ", ".join(f"{k}={before[k]:.4f}" for k in ("eval/accuracy", "eval/pass@k")))
    print("final:       " + ", ".join(f"{k}={final[k]:.4f}" for k in shown if k in final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
