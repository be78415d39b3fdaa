"""The SaEI-GRPO job: `python -m cluster.train --config configs/<name>.yaml key=value ...`

Joins the Ray cluster named by `cluster.address` or `RAY_ADDRESS` (as under `ray job submit`), or
starts a local one bound to 127.0.0.1 (dashboard on 127.0.0.1) with Ray's token authentication on.
Builds the synthetic data and the tiny policy when the config asks for them and they are missing,
starts the rollout pool, the adversary and the learner group, runs `run.steps` steps of
cluster.pipeline.saei_step, evaluates before the first step and every `run.eval_every` steps,
checkpoints every `run.save_every` steps and at the end, writes metrics.jsonl, TensorBoard events,
PNG curves and summary.json into the run folder, and exits 0.
Ctrl-C (SIGINT) or SIGTERM (`ray job stop`, preemption) stops the job at the next step boundary with a
checkpoint and prints the command that resumes it (exit 130 / 143); a second one stops at once.
(`ray job stop` sends SIGKILL RAY_JOB_STOP_WAIT_TIME_S after SIGTERM, 3 s by default: set it in the job's
runtime_env env_vars above a step's time, or rely on `run.save_every`.)
Unusable input (data, model folder, `run.resume_from`) is refused before Ray starts (exit 2).
`--help-config` prints every key of the config tree with its documentation.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.checkpoints import (  # noqa: F401 (Cursor: the data cursor's home was here)
    Cursor,
    Interrupted,
    JobStopped,
    checkpoint_step,
    parent,
    resolve_checkpoint,
    run_dir_for,
)
from cluster.run_folder import RunFolder
from core.config import Config, ConfigError, describe, load_config, to_yaml
from core.resources import PlacementTimeout
from core.storage import Storage

log = logging.getLogger("cluster.train")


class InputError(ValueError):
    """The job's input (data files, model folder, checkpoint) is unusable; raised before Ray starts."""


def local_cluster_env(cfg: Config) -> bool:
    """Whether the job starts its own local Ray cluster (no `cluster.address`, no RAY_ADDRESS); if so, set
    what that cluster must start with, before anything imports ray in this process:
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray binds loopback only; it reads the variable once, when `ray`
    is first imported) and RAY_AUTH_MODE=token (Ray's token authentication), each unless the user set it.
    Nothing is set when joining a cluster: with the first variable, `ray start --address` refuses to join
    a multi-node one."""
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        log.warning("ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: the local Ray cluster "
                    "binds every interface (set the variable before importing ray)")
    return True


def auth_token_source() -> str:
    """Where the Ray clients of this process read the cluster's token from (Ray's own order)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN variable"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")


def init_ray(cfg: Config):
    """Join `cluster.address` / RAY_ADDRESS, or start a local cluster bound to 127.0.0.1 with token auth."""
    local = local_cluster_env(cfg)
    import ray

    c = cfg.cluster
    if not local:
        ray.init(address=c.address or os.environ["RAY_ADDRESS"], namespace=c.namespace, log_to_driver=True)
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
    # what `ray.init(address=...)`, `python -m cluster.ops --address` and `ray status` take
    log.info("local Ray cluster at %s", ray.get_runtime_context().gcs_address)
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        log.info("Ray token authentication is on: a client needs RAY_AUTH_MODE=token and the token in %s",
                 auth_token_source())
    if c.dashboard and getattr(ctx, "dashboard_url", None):
        log.info("Ray dashboard: http://%s", ctx.dashboard_url)
    return ray


@dataclass
class Inputs:
    """What the job was given, checked before Ray starts."""

    model_path: str
    """The policy folder (bootstrapped first when the config asks for the tiny one), or its storage URI."""
    train_prompts: list
    """Training prompts (core.batch.Prompt)."""
    test_prompts: list
    """Held-out prompts of the evaluations."""
    resume: Storage | None
    """The complete checkpoint `run.resume_from` names, in storage (None: a new run)."""
    resume_step: int | None
    """The step that checkpoint was written after."""


def check_inputs(cfg: Config) -> Inputs:
    """Every input a user gave, checked before Ray starts; an InputError names what is wrong."""
    from cluster.placement import check_placement

    try:  # the cheap checks first: a bootstrap could take minutes
        check_placement(cfg)  # a ConfigError naming the cluster.* keys: two NCCL ranks on one GPU
        resume = resolve_checkpoint(cfg) if cfg.run.resume_from else None
        resume_step = checkpoint_step(resume) if resume is not None else None
        if resume_step is not None and resume_step > cfg.run.steps:
            raise ValueError(f"{resume.uri} is after step {resume_step}, beyond run.steps={cfg.run.steps}")
        # unreachable storage, missing credentials, a read-only folder: one line naming the URI, now
        ((resume and _run_storage(resume)) or Storage(cfg.run.output_dir)).check_writable()
        from cluster.bootstrap import ensure_data, ensure_policy, load_split  # torch, transformers: seconds
        from core.node_cache import node_local
        from core.policy import load_processor

        ensure_data(cfg)
        model_path = str(ensure_policy(cfg, progress=cfg.logging.progress_bar))
        processor = load_processor(node_local(model_path))  # a URI: fetched into this node's cache
        train_prompts = load_split(cfg, processor, cfg.data.train_files, cfg.data.limit_train)
        test_prompts = load_split(cfg, processor, cfg.data.test_files, cfg.data.limit_test)
    except (ValueError, OSError) as e:  # core.data.DataError and ConfigError are ValueErrors
        raise InputError(f"{type(e).__name__}: {e}") from e
    return Inputs(model_path, train_prompts, test_prompts, resume, resume_step)


def _run_storage(resume: Storage) -> Storage | None:
    """The run folder of a checkpoint `<run>/checkpoints/step_N` (None: a checkpoint elsewhere)."""
    up = parent(resume)
    return parent(up) if up.uri.rstrip("/").endswith("/checkpoints") else None


def open_run_folder(cfg: Config, resume: Storage | None) -> RunFolder:
    """A resumed run keeps its folder (one metrics file, one set of curves); a new run gets a new one.
    The folder is in storage (`run.output_dir`: a local path or a URI); the driver writes its own files
    into `RunFolder.local` and uploads them (a local run folder is its own local folder)."""
    storage = _run_storage(resume) if resume is not None else None
    if storage is None:
        storage = run_dir_for(cfg)
        if storage.is_local:
            Path(storage.uri).mkdir(parents=True)  # two runs that start in the same second: one fails here
    run = RunFolder(storage, cfg.logging.sync_every_s, resume=resume is not None and storage.exists())
    # Ray Train's storage marker: every learner rank checks it reads this token (learner.checkpoint.
    # check_storage_visible), so a folder only this node can see fails at start
    run.token = storage.write_marker()
    (run.local / "config.yaml").write_text(to_yaml(cfg))
    run.sync(force=True)
    if storage.is_local:
        log.info("run folder %s", storage.uri)
    else:
        log.info("run folder %s (the driver's files are staged in %s)", storage.uri, run.local)
    return run


def train(cfg: Config) -> dict:
    """The whole job; returns the summary (also written to <run dir>/summary.json). Raises InputError
    (before Ray starts), JobStopped (a learner rank died) or Interrupted (SIGINT / SIGTERM)."""
    t_start = time.perf_counter()
    inputs = check_inputs(cfg)
    run = open_run_folder(cfg, inputs.resume)
    init_ray(cfg)
    from cluster.job import Job, StopFlag

    stop = StopFlag()
    stop.install()
    job = None
    try:
        job = Job(cfg, inputs, run)  # the roles: learner group, rollout pool, adversary, controller
        first_step = job.resume()
        stopped_after = job.run(first_step, stop)
        if stopped_after is not None:
            raise job.interrupted(stopped_after, stop.signum)
        return job.finish(t_start)
    except JobStopped:
        run.sync_quietly()  # the metrics up to the stop, next to the checkpoint to resume from
        raise
    except KeyboardInterrupt:  # a second signal (or one before the handlers were in place)
        last = job.last_checkpoint if job is not None else (inputs.resume.uri if inputs.resume else None)
        raise Interrupted(stop.signum or signal.SIGINT, last) from None


def _print_summary(summary: dict) -> None:
    final = summary["final"]
    print(f"\nrun folder:  {summary['run_dir']}  ({summary['seconds']:.0f} s, {summary['steps']} steps)")
    if summary.get("staged_in"):
        print(f"local copy:  {summary['staged_in']}  (the driver's files, uploaded to the run folder)")
    print(f"checkpoint:  {summary['checkpoint']}  (Hugging Face folder: {summary['policy']})")
    print(f"plots:       {', '.join(summary['plots']) or 'none'}")
    print(f"metrics:     {summary['run_dir']}/metrics.jsonl, TensorBoard in {summary['run_dir']}/tensorboard")
    shown = ("reward/clean", "reward/adversarial", "entropy/clean", "entropy/adversarial", "eval/accuracy",
             "eval/pass@k")
    before = summary["before_training"]
    if before:
        print("before:      " + ", ".join(f"{k}={before[k]:.4f}" for k in ("eval/accuracy", "eval/pass@k")))
    print("final:       " + ", ".join(f"{k}={final[k]:.4f}" for k in shown if k in final))


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
    local_cluster_env(cfg)  # before anything imports ray
    logging.basicConfig(level=getattr(logging, cfg.logging.level, logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = ["python", "-m", "cluster.train", *(["--config", args.config] if args.config else []),
               *(o for o in args.overrides if not o.startswith("run.resume_from="))]
    try:
        summary = train(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (JobStopped, PlacementTimeout) as e:  # PlacementTimeout: a role found no room at the start
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(e.message(command), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before the job's own handlers were in place: nothing to resume from
        print("interrupted before the job started; no checkpoint was written", file=sys.stderr)
        return 130
    _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
