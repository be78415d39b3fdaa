"""Checks of a loaded config: `ConfigError`, the fields restricted to a set of values, and `validate`.

`validate` runs one check per section, so a reader looking for why `rollout.n_adv=...` was refused
finds it under `_check_rollout`. Every problem names its key; all problems are reported at once.
"""

from __future__ import annotations

import difflib
from typing import Any

from core.config_schema import Config


class ConfigError(ValueError):
    """A config problem; the message names the key (and the file, when one was given)."""


# Fields restricted to a set of values, checked by `validate`.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("qwen2_vl", "qwen2_5_vl"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "rollout.engine": ("hf", "vllm"),
    "adversary.kind": ("pgd", "noise", "none"),
    "adversary.learn_on": ("adversarial", "clean"),
    "adversary.tsec.mode": ("band", "all", "random", "top", "bottom"),
    "adversary.tsec.scope": ("sequence", "group"),
    "learner.loss_mode": ("clip", "kl_cov", "clip_cov"),
    "learner.aggregation": ("token-mean", "seq-mean-token-mean"),
    "learner.advantage_scale": ("std", "none"),
    "learner.mixed_precision": ("auto", "float32", "bfloat16"),
    "cluster.weight_sync": ("object_store", "broadcast"),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}


def _get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


class _Problems(list):
    """The problems found so far; `check` adds one naming the key and its value when `ok` is false."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    def check(self, ok: bool, key: str, msg: str) -> None:
        if not ok:
            self.append(f"{key}: {msg} (got {_get(self.cfg, key)!r})")


def validate(cfg: Config) -> None:
    """Reject impossible values before anything starts; every message names its key."""
    problems = _Problems(cfg)
    _check_choices(cfg, problems)
    for check_section in (_check_model, _check_rollout, _check_adversary, _check_learner, _check_data,
                          _check_run, _check_cluster):
        check_section(cfg, problems)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _check_choices(cfg: Config, problems: _Problems) -> None:
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{key}: must be one of {', '.join(choices)} (got {value!r}){hint}")


def _check_model(cfg: Config, problems: _Problems) -> None:
    problems.check(cfg.model.ship_max_gb >= 0, "model.ship_max_gb", "must be >= 0 (0: never ship the folder)")
    if "://" in cfg.model.path and cfg.model.path.split("://", 1)[1].strip("/") == "":
        problems.append(f"model.path: a storage URI must name a folder (got {cfg.model.path!r})")
    problems.check(not (cfg.model.shared_prefix and cfg.model.attn_implementation == "flash_attention_2"),
                   "model.shared_prefix", "needs a kernel that takes a custom attention mask (sdpa or eager); set "
                   "it to false with model.attn_implementation=flash_attention_2")


def _check_rollout(cfg: Config, problems: _Problems) -> None:
    r, check = cfg.rollout, problems.check
    check(r.n_clean >= 0, "rollout.n_clean", "must be >= 0")
    check(r.n_adv >= 0, "rollout.n_adv", "must be >= 0")
    if r.n_clean + r.n_adv == 0:
        problems.append("rollout.n_clean + rollout.n_adv: must be > 0 (got 0)")
    if r.n_adv > 0 and r.n_clean == 0 and cfg.adversary.kind == "pgd":
        problems.append("rollout.n_clean: the pgd attack needs clean responses to rank entropy (got 0 with n_adv > 0)")
    elif r.n_clean + r.n_adv < 2:
        problems.append(f"rollout.n_clean + rollout.n_adv: a GRPO group needs at least 2 (got {r.n_clean + r.n_adv})")
    check(r.sampling.temperature >= 0, "rollout.sampling.temperature", "must be >= 0")
    check(0 < r.sampling.top_p <= 1, "rollout.sampling.top_p", "must be in (0, 1]")
    check(r.sampling.top_k == -1 or r.sampling.top_k > 0, "rollout.sampling.top_k", "must be -1 or > 0")
    check(r.sampling.max_new_tokens > 0, "rollout.sampling.max_new_tokens", "must be > 0")
    check(r.eval_k >= 1, "rollout.eval_k", "must be >= 1")
    check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
    check(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", "must be >= 1")
    check(r.max_batch_requests >= 1, "rollout.max_batch_requests", "must be >= 1")
    check(r.stream_chunk >= 1, "rollout.stream_chunk", "must be >= 1")
    if r.kv_cache_gb is not None and r.kv_cache_gb <= 0:
        problems.append(f"rollout.kv_cache_gb: must be > 0 or null (got {r.kv_cache_gb!r})")
    if r.max_model_len is not None and r.max_model_len < 1:
        problems.append(f"rollout.max_model_len: must be >= 1 or null (got {r.max_model_len!r})")


def _check_adversary(cfg: Config, problems: _Problems) -> None:
    a, check = cfg.adversary, problems.check
    band = a.tsec.band
    if len(band) != 2 or not all(0 <= x <= 1 for x in band) or band[0] >= band[1]:
        problems.append(f"adversary.tsec.band: must be [low, high] with 0 <= low < high <= 1 (got {band!r})")
    check(a.step_size > 0, "adversary.step_size", "must be > 0")
    check(a.steps >= 1, "adversary.steps", "must be >= 1")
    if a.eps is not None and a.eps < 0:
        problems.append(f"adversary.eps: must be >= 0 (got {a.eps!r})")
    check(0 <= a.noise_t_start < 1000, "adversary.noise_t_start", "must be in [0, 1000)")
    check(0 <= a.noise_t_end < 1000, "adversary.noise_t_end", "must be in [0, 1000)")
    check(a.chunk_tokens > 0, "adversary.chunk_tokens", "must be > 0")


def _check_learner(cfg: Config, problems: _Problems) -> None:
    lr, check = cfg.learner, problems.check
    check(lr.lr > 0, "learner.lr", "must be > 0")
    check(lr.clip_low >= 0, "learner.clip_low", "must be >= 0")
    check(lr.clip_high >= 0, "learner.clip_high", "must be >= 0")
    check(lr.kl_coef >= 0, "learner.kl_coef", "must be >= 0")
    check(lr.grad_clip >= 0, "learner.grad_clip", "must be >= 0")
    check(lr.micro_batch_size >= 1, "learner.micro_batch_size", "must be >= 1")
    check(lr.epochs >= 1, "learner.epochs", "must be >= 1")
    check(lr.num_workers >= 0, "learner.num_workers", "must be >= 0")
    check(lr.warmup_steps >= 0, "learner.warmup_steps", "must be >= 0")
    check(lr.head_chunk >= 1, "learner.head_chunk", "must be >= 1")
    check(len(lr.betas) == 2 and all(0 <= b < 1 for b in lr.betas), "learner.betas", "must be two numbers in [0, 1)")
    check(0 < lr.kl_cov_frac <= 1, "learner.kl_cov_frac", "must be in (0, 1]")
    check(0 < lr.clip_cov_frac <= 1, "learner.clip_cov_frac", "must be in (0, 1]")
    check(len(lr.clip_cov_bounds) == 2 and lr.clip_cov_bounds[0] < lr.clip_cov_bounds[1],
          "learner.clip_cov_bounds", "must be [lower, upper] with lower < upper")


def _check_data(cfg: Config, problems: _Problems) -> None:
    d, check = cfg.data, problems.check
    check(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    check(len(d.train_files) > 0, "data.train_files", "must name at least one file")
    check(d.synthetic.image_size % 28 == 0 and d.synthetic.image_size >= 56, "data.synthetic.image_size",
          "must be a multiple of 28 and >= 56")
    check(0 <= d.synthetic.difficulty <= 3, "data.synthetic.difficulty", "must be in 0..3")
    check(d.synthetic.n_train > 0 and d.synthetic.n_test > 0, "data.synthetic.n_train",
          "synthetic splits must be non-empty")
    from core.synthetic import FAMILIES  # the task owns its family names

    bad_fam = [f for f in d.synthetic.families if f not in FAMILIES]
    if bad_fam or not d.synthetic.families:
        problems.append(f"data.synthetic.families: choose from {', '.join(FAMILIES)} (got {d.synthetic.families!r})")
    if d.max_pixels is not None and d.max_pixels < 56 * 56:
        problems.append(f"data.max_pixels: must be >= {56 * 56} (got {d.max_pixels})")


def _check_run(cfg: Config, problems: _Problems) -> None:
    problems.check(cfg.run.steps >= 0, "run.steps", "must be >= 0")
    problems.check(cfg.run.eval_every >= 0, "run.eval_every", "must be >= 0")
    problems.check(cfg.run.save_every >= 0, "run.save_every", "must be >= 0")


def _check_cluster(cfg: Config, problems: _Problems) -> None:
    c, check = cfg.cluster, problems.check
    check(c.learner_threads >= 0, "cluster.learner_threads", "must be >= 0 (0: the node's cores among the ranks)")
    check(c.rollout_workers >= 1, "cluster.rollout_workers", "must be >= 1")
    check(c.max_restarts >= 0, "cluster.max_restarts", "must be >= 0")
    for key in ("rollout_cpus", "rollout_gpus", "adversary_cpus", "adversary_gpus", "learner_cpus", "learner_gpus"):
        check(getattr(c, key) >= 0, f"cluster.{key}", "must be >= 0")
    check(c.weight_bucket_mb > 0, "cluster.weight_bucket_mb", "must be > 0")
    check(c.weight_sync_timeout_s > 0, "cluster.weight_sync_timeout_s", "must be > 0")
    check(c.placement_timeout_s > 0, "cluster.placement_timeout_s", "must be > 0")
    _check_role_resources(cfg, problems)


def _check_role_resources(cfg: Config, problems: _Problems) -> None:
    """Custom Ray resources and accelerator types of the roles (cluster.<role>_resources / _accelerator_type)."""
    c = cfg.cluster
    for role in ("learner", "rollout", "adversary"):
        key = f"cluster.{role}_resources"
        for name, amount in getattr(c, f"{role}_resources").items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                problems.append(f"{key}.{name}: set CPUs and GPUs with cluster.{role}_cpus / cluster.{role}_gpus, "
                                f"not as a custom resource (got {amount!r})")
            elif not amount >= 0:
                problems.append(f"{key}.{name}: must be >= 0 (got {amount!r})")
        accel = getattr(c, f"{role}_accelerator_type")
        if accel is not None and (not accel.strip() or ":" in accel):
            problems.append(f"cluster.{role}_accelerator_type: must be a Ray accelerator type such as A100 or "
                            f"H100, or null for any (got {accel!r})")
