"""The one typed config tree of SaEI-RL.

The dataclasses below are the only defaults; each field's docstring (the string literal under it) is
its documentation, which `describe()` prints for `--help`. YAML files in configs/ and `key=value`
overrides (OmegaConf dotlist) are merged over them by `load_config`. An unknown key, a wrong type or
an impossible value is a `ConfigError` naming the key (with the nearest valid key for a typo) before
anything starts.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A config problem; the message names the key (and the file, when one was given)."""


@dataclass
class RunConfig:
    name: str = "saei"
    """Run name; the run folder is `<output_dir>/<name>`."""
    output_dir: str = "runs"
    """Folder that holds run folders, the tiny policy and the synthetic data."""
    seed: int = 0
    """Seed of everything random in the run (data order, sampling, attack tie-breaks, init)."""
    steps: int = 40
    """Number of training steps (one step = one batch of prompts through the SaEI loop)."""
    eval_every: int = 20
    """Evaluate on the test split every this many steps (0: only at the end)."""
    eval_before_train: bool = True
    """Evaluate once before the first step (logged as step 0): the baseline the curves start from.
    Skipped when resuming."""
    save_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end)."""
    resume_from: str | None = None
    """Resume from a checkpoint folder, a run folder (its newest complete checkpoint) or `latest` (the newest
    complete checkpoint of the newest `<output_dir>/<name>-*` run). Exact: model, optimizer, RNG and data
    cursor; the job continues in the checkpoint's run folder and drops the metrics of later steps."""


@dataclass
class ModelConfig:
    path: str = "${run.output_dir}/tiny_policy/bootstrap"
    """Local Hugging Face folder of the policy (Qwen2-VL or Qwen2.5-VL). Nothing is fetched from a hub."""
    build_tiny: bool = True
    """When `path` is missing, build the tiny policy and run the supervised bootstrap to create it."""
    arch: str = "qwen2_vl"
    """Architecture of the tiny policy when it is built: qwen2_vl or qwen2_5_vl."""
    dtype: str = "auto"
    """Weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16."""
    attn_implementation: str = "sdpa"
    """Attention kernel for transformers models: sdpa, eager or flash_attention_2 (GPU)."""
    shared_prefix: bool = True
    """Score a prompt's responses in one row (learner and adversary): the prompt once, each response
    attending to it and to itself only (Prefix Grouper). Same values as one row per response for a
    fraction of the compute when prompts are longer than responses (the embedded task: 80-token prompts,
    16-token answers). Needs a kernel that takes a custom mask (sdpa or eager), so false with
    flash_attention_2."""


@dataclass
class SyntheticConfig:
    n_train: int = 2000
    """Examples in the synthetic train split."""
    n_test: int = 200
    """Examples in the synthetic test split."""
    families: list[str] = field(default_factory=lambda: ["count", "total", "more"])
    """Task families to draw from: count, total, more (perceivable by the tiny policy), arith, angle, pythag."""
    difficulty: int = 0
    """Difficulty knob of every family (0 = easiest, up to 3)."""
    image_size: int = 112
    """Side of the square figures in pixels (a multiple of 28)."""
    seed: int = 0
    """Seed of the synthetic data (independent of run.seed so that runs share one data set)."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=lambda: ["${run.output_dir}/data/synthetic/train.parquet"])
    """Training files or folders: geometry3k-style parquet or MM-Eureka-style JSONL."""
    test_files: list[str] = field(default_factory=lambda: ["${run.output_dir}/data/synthetic/test.parquet"])
    """Evaluation files or folders, same formats."""
    build_synthetic: bool = True
    """When the default synthetic files are missing, render them (see `synthetic`)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The embedded synthetic visual task."""
    prompt_key: str = "problem"
    """Column holding the question text (parquet)."""
    answer_key: str = "answer"
    """Column holding the reference answer (parquet)."""
    image_key: str = "images"
    """Column holding the list of {bytes, path} images (parquet)."""
    image_root: str | None = None
    """Folder that relative image paths are resolved against (default: the data file's folder)."""
    format_prompt: str = " Put the final answer in \\boxed{}."
    """Text appended to every question (the answer format the reward expects)."""
    max_pixels: int | None = None
    """Cap on image pixels before the processor (None: the processor's own max_pixels)."""
    strict: bool = False
    """Reject a data file on its first bad row instead of skipping and counting bad rows."""
    batch_size: int = 8
    """Prompts per training step."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (seeded by run.seed)."""
    limit_train: int | None = None
    """Use only the first N training prompts (debugging)."""
    limit_test: int | None = None
    """Use only the first N test prompts for evaluation."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = -1
    """Top-k sampling (-1: off)."""
    max_new_tokens: int = 48
    """Cap on generated tokens per response."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings (generation always stops at the end-of-turn token)."""


@dataclass
class RolloutConfig:
    n_clean: int = 6
    """Responses sampled per prompt on the clean image (n1 in the paper)."""
    n_adv: int = 6
    """Responses sampled per prompt on the adversarial image (n2; 0 = vanilla GRPO)."""
    engine: str = "hf"
    """Inference engine: hf (transformers generate: the embedded CPU default, fastest for the tiny policy)
    or vllm (the production engine: GPU, or its CPU build; see the README's "Which engine")."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling parameters for training rollouts."""
    eval_k: int = 4
    """Samples per test prompt for eval/pass@k (greedy accuracy is measured separately)."""
    gpu_memory_utilization: float = 0.4
    """Fraction of GPU memory vLLM may take (it shares the GPU with the learner and the adversary)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism per rollout worker."""
    enforce_eager: bool | None = None
    """vLLM without CUDA graphs / torch.compile (faster start, slower decode); None: eager on CPU, not on GPU."""
    kv_cache_gb: float | None = None
    """KV cache of each vLLM engine in GiB (None: on GPU what gpu_memory_utilization leaves, on CPU 1)."""
    max_model_len: int | None = None
    """Longest prompt + response a vLLM engine serves (None: the model's own limit)."""
    vllm_inprocess: bool | None = None
    """Run vLLM's engine core inside the rollout actor's process (None: on CPU yes: on 2 cores it started in
    5 s instead of 26 and two actors scaled 1.48x instead of 0.89x; on GPU no, vLLM's default)."""
    max_batch_requests: int = 64
    """Most requests one engine call batches together (bounds memory of the HF engine)."""
    stream_chunk: int = 2
    """Prompts per rollout task in a training step: smaller streams clean samples to the adversary
    sooner, larger batches better in the engine (bench/step_overhead.py on 2 CPU cores, 8 prompts x
    (6 + 6): SaEI / GRPO step 1.07 at 2, 1.11 at 1)."""


@dataclass
class TsecConfig:
    band: list[float] = field(default_factory=lambda: [1 / 3, 2 / 3])
    """[low, high] rank fractions of the kept entropy band (the paper keeps the middle third)."""
    mode: str = "band"
    """Token selection: band, all (EgAS without TsEC), random, top or bottom."""
    scope: str = "sequence"
    """Rank tokens per response (sequence) or across the prompt's responses together (group)."""


@dataclass
class AdversaryConfig:
    kind: str = "pgd"
    """Perturbation: pgd (EgAS), noise (NoisyRollout's Gaussian baseline) or none."""
    step_size: float = 32 / 255
    """PGD step size a in [0, 1] pixel units; multiples of 1/255 keep images exact uint8. 32/255 is the
    embedded default's calibration: the bootstrapped tiny policy's selective entropy moves +0.4% under one
    2/255 step (the paper's, kept in configs/saei.yaml and the 7B config), +3.5% under 16/255 and +8.2%
    under 32/255 (bench/attack_calibration.py; +14.5% on average over `make train`'s 40 steps)."""
    steps: int = 1
    """PGD steps T (the paper uses 1)."""
    eps: float | None = None
    """L-inf bound of the perturbation (None: step_size * steps)."""
    learn_on: str = "adversarial"
    """Image the update conditions adversarial samples on: adversarial (as drawn) or clean."""
    tsec: TsecConfig = field(default_factory=TsecConfig)
    """Token-selective entropy (TsEC) settings."""
    noise_t_start: int = 450
    """NoisyRollout baseline: diffusion step t at the start of training (of 1000)."""
    noise_t_end: int = 0
    """NoisyRollout baseline: diffusion step t at the end of training (annealed linearly)."""
    chunk_tokens: int = 8192
    """Most response tokens per forward chunk in the attack (bounds memory)."""


@dataclass
class LearnerConfig:
    lr: float = 3e-5
    """AdamW learning rate (the embedded default, measured on the bootstrapped tiny policy: 1e-4 lowered
    its test accuracy within 30 steps; real policies want about 1e-6, as configs/geo3k_* set)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0: off)."""
    clip_low: float = 0.2
    """PPO ratio clip below 1 (epsilon_low)."""
    clip_high: float = 0.2
    """PPO ratio clip above 1 (epsilon_high; DAPO's clip-higher uses 0.28)."""
    loss_mode: str = "clip"
    """Policy loss: clip (GRPO), kl_cov or clip_cov (Entropy-Mechanism-of-RL variants)."""
    aggregation: str = "token-mean"
    """Loss aggregation: token-mean or seq-mean-token-mean (the original GRPO)."""
    advantage_scale: str = "std"
    """Group advantage scaling: std ((r - mean) / std) or none (r - mean, Dr. GRPO)."""
    kl_coef: float = 0.0
    """Coefficient of the k3 KL penalty to the frozen reference policy (0: no reference kept)."""
    kl_cov_frac: float = 0.002
    """kl_cov: fraction of tokens whose covariance term is penalised."""
    kl_cov_coef: float = 1.0
    """kl_cov: coefficient of the KL penalty on the selected tokens."""
    clip_cov_frac: float = 0.0002
    """clip_cov: fraction of tokens whose gradient is detached."""
    clip_cov_bounds: list[float] = field(default_factory=lambda: [1.0, 5.0])
    """clip_cov: [lower, upper] covariance bounds of the tokens that may be clipped."""
    micro_batch_size: int = 48
    """Sequences (responses) per forward/backward (gradient accumulation over the step's batch). With
    model.shared_prefix a micro-batch holds its prompts once each, so larger ones save more: 48 (half
    the embedded default's 96) measured 0.31 s per update against 0.61 s with 8. Large policies on
    GPUs want a few (the 7B config: 4)."""
    epochs: int = 1
    """Passes over each step's batch (1 = on-policy; >1 uses the clipped ratio)."""
    num_workers: int = 1
    """Learner ranks as Ray actors (0: one worker in the driver process, for debugging)."""
    mixed_precision: str = "auto"
    """FSDP2 parameter dtype: auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many optimizer steps (0: constant lr from the start)."""
    gradient_checkpointing: bool = False
    """Recompute decoder-layer and vision-block activations in backward (for memory, at ~30% compute)."""
    freeze_vision_tower: bool = True
    """Keep the vision tower (with its merger) fixed in RL, as EasyR1's `freeze_vision_tower`: only the
    language model learns; the attack still differentiates through the tower to the pixels. On by default
    for the embedded default (RL's noisy updates blur what the tiny tower learned to see); false trains
    every weight."""
    head_chunk: int = 2048
    """Response tokens per chunk of the language-model head in the loss ([chunk, vocab] logits at a time)."""


@dataclass
class ClusterConfig:
    address: str | None = None
    """Ray address to join (also RAY_ADDRESS); None starts a local cluster on 127.0.0.1."""
    num_cpus: int | None = None
    """CPUs of a locally started cluster (None: all of this machine's)."""
    dashboard: bool = True
    """Start Ray's dashboard with a locally started cluster."""
    dashboard_host: str = "127.0.0.1"
    """Host the local dashboard binds to (loopback unless you mean to expose it)."""
    rollout_workers: int = 1
    """Rollout actors in the pool (scalable at run time with `python -m cluster.ops scale`)."""
    rollout_cpus: float = 1.0
    """CPUs per rollout actor."""
    rollout_gpus: float = 0.0
    """GPUs per rollout actor (fractions share a GPU)."""
    adversary_cpus: float = 1.0
    """CPUs of the adversary actor."""
    adversary_gpus: float = 0.0
    """GPUs of the adversary actor."""
    learner_cpus: float = 1.0
    """CPUs per learner rank (what Ray reserves)."""
    learner_threads: int = 0
    """Torch threads of each learner rank on CPU. 0: the node's cores divided among the learner ranks,
    since the update runs while the rollout actors and the adversary wait (the step is synchronous),
    so it can use the cores they generate on; n > 0: exactly n."""
    learner_gpus: float = 0.0
    """GPUs per learner rank."""
    weight_sync: str = "object_store"
    """Weight transport to the rollout engines and the adversary: object_store (ray.put once, every actor
    gets it: the embedded default) or broadcast (a process group from learner rank 0 to every engine's
    worker processes and the adversary, gloo on CPU, NCCL on GPU; see the README's "Weight sync")."""
    weight_bucket_mb: float = 512
    """Bucket size of a broadcast in MiB (one collective per bucket; a larger tensor gets its own)."""
    weight_sync_timeout_s: float = 120
    """A broadcast collective that waits longer (a receiver died) fails; the sync then goes through the
    object store and the next one builds a new group."""
    max_restarts: int = 3
    """Restarts Ray may make of a dead rollout actor."""
    placement_timeout_s: float = 300
    """How long a role waits for room on the cluster (a new rollout actor of `cluster.ops scale`, a
    restarted one) before the job gives up on it with a message naming the resources it asked for; on
    an autoscaling cluster waiting is normal, so this is minutes, not seconds."""
    namespace: str = "saei"
    """Ray namespace of the job's named actors (the ops CLI finds the controller there)."""
    metrics_export_port: int | None = None
    """Port of the local Ray node's Prometheus endpoint (None: Ray picks one); for a cluster use `ray start`'s."""


@dataclass
class LoggingConfig:
    jsonl: bool = True
    """Write `metrics.jsonl` in the run folder."""
    tensorboard: bool = True
    """Write TensorBoard events in the run folder."""
    ray_metrics: bool = True
    """Export gauges and counters through Ray's metrics (Prometheus, the dashboard)."""
    progress_bar: bool = True
    """Show a progress bar on the terminal."""
    plots: bool = True
    """Write PNG curves of reward, accuracy and entropy at the end of the run."""
    level: str = "INFO"
    """Python log level."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity, length and checkpoint cadence."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Clean and adversarial sampling."""
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    """The selective-entropy attack (TsEC + EgAS) and its baselines."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The GRPO update."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray cluster, placement and resources."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""


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


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the tree, sections included (`run`, `run.name`, ...)."""
    keys = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        sub = _dataclass_type(cls, f.name)
        if sub is not None:
            keys += all_keys(sub, key + ".")
    return keys


def _dataclass_type(cls: type, name: str) -> type | None:
    default = next(f for f in fields(cls) if f.name == name).default_factory
    if callable(default):
        value = default()
        if is_dataclass(value):
            return type(value)
    return None


def _suggest(bad_key: str) -> str:
    keys = all_keys()
    leaves = [k for k in keys if "." in k and k.split(".")[0] in {f.name for f in fields(Config)}]
    leaf = bad_key.rsplit(".", 1)[-1]
    # A right name under the wrong section (`rollout.lr`) first, then a typo of the whole key.
    close = [k for k in leaves if k.rsplit(".", 1)[-1] == leaf][:1]
    close = close or difflib.get_close_matches(bad_key, keys, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _where(source: str | None) -> str:
    return f" (in {source})" if source else ""


def _merge(base, other, source: str | None):
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e)
        raise ConfigError(f"unknown config key '{key}'{_where(source)}{_suggest(key)}") from None
    except ValidationError as e:
        section = _scalar_on_section(base, other)
        if section:
            raise ConfigError(f"config key '{section}'{_where(source)} is a section: set its fields "
                              f"(e.g. {section}.<field>=...), not a value") from None
        expected = _expected_type(e.full_key)
        raise ConfigError(f"config key '{e.full_key}'{_where(source)}: {str(e.msg or e).splitlines()[0]}"
                          f"{f' (expected {expected})' if expected else ''}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"config{_where(source)}: {e}") from None


def _scalar_on_section(base, other, prefix: str = "") -> str | None:
    """The first dotted key where `other` puts a plain value over a section of `base`."""
    if not OmegaConf.is_dict(other):
        return None
    for key, value in other.items_ex(resolve=False) if hasattr(other, "items_ex") else other.items():
        sub = base.get(key) if OmegaConf.is_dict(base) else None
        if OmegaConf.is_dict(sub):
            if not OmegaConf.is_dict(value):
                return f"{prefix}{key}"
            found = _scalar_on_section(sub, value, f"{prefix}{key}.")
            if found:
                return found
    return None


def _expected_type(key: str | None) -> str | None:
    if not key:
        return None
    cls: Any = Config
    for part in key.split("[")[0].split("."):
        match = [f for f in fields(cls) if f.name == part] if is_dataclass(cls) else []
        if not match:
            return None
        sub = _dataclass_type(cls, part)
        if sub is None:
            t = match[0].type
            return t if isinstance(t, str) else getattr(t, "__name__", str(t))
        cls = sub
    return None


def load_config(yaml_path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Typed defaults, then the YAML file, then `key=value` overrides; validated.

    Raises ConfigError naming the key (and the nearest valid key for a typo) on an unknown key, a
    wrong type or an impossible value.
    """
    cfg = OmegaConf.structured(Config)
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry line numbers: keep them
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        cfg = _merge(cfg, loaded, str(path))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value")
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as e:
            raise ConfigError(f"bad override in {overrides}: {e}") from None
        cfg = _merge(cfg, dot, "command-line overrides")
    try:
        OmegaConf.resolve(cfg)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key '{getattr(e, 'full_key', '')}': {e}") from None
    validate(obj)
    return obj


def _get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> None:
    """Reject impossible values before anything starts; every message names its key."""
    problems: list[str] = []

    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            problems.append(f"{key}: {msg} (got {_get(cfg, key)!r})")

    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{key}: must be one of {', '.join(choices)} (got {value!r}){hint}")

    r, a, lr, d, c = cfg.rollout, cfg.adversary, cfg.learner, cfg.data, cfg.cluster
    check(not (cfg.model.shared_prefix and cfg.model.attn_implementation == "flash_attention_2"),
          "model.shared_prefix", "needs a kernel that takes a custom attention mask (sdpa or eager); set it to "
          "false with model.attn_implementation=flash_attention_2")
    check(r.n_clean >= 0, "rollout.n_clean", "must be >= 0")
    check(r.n_adv >= 0, "rollout.n_adv", "must be >= 0")
    if r.n_clean + r.n_adv == 0:
        problems.append("rollout.n_clean + rollout.n_adv: must be > 0 (got 0)")
    if r.n_adv > 0 and r.n_clean == 0 and a.kind == "pgd":
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

    check(lr.lr > 0, "learner.lr", "must be > 0")
    check(lr.clip_low >= 0, "learner.clip_low", "must be >= 0")
    check(lr.clip_high >= 0, "learner.clip_high", "must be >= 0")
    check(lr.kl_coef >= 0, "learner.kl_coef", "must be >= 0")
    check(lr.grad_clip >= 0, "learner.grad_clip", "must be >= 0")
    check(lr.micro_batch_size >= 1, "learner.micro_batch_size", "must be >= 1")
    check(c.learner_threads >= 0, "cluster.learner_threads", "must be >= 0 (0: the node's cores among the ranks)")
    check(lr.epochs >= 1, "learner.epochs", "must be >= 1")
    check(lr.num_workers >= 0, "learner.num_workers", "must be >= 0")
    check(lr.warmup_steps >= 0, "learner.warmup_steps", "must be >= 0")
    check(lr.head_chunk >= 1, "learner.head_chunk", "must be >= 1")
    check(len(lr.betas) == 2 and all(0 <= b < 1 for b in lr.betas), "learner.betas", "must be two numbers in [0, 1)")
    check(0 < lr.kl_cov_frac <= 1, "learner.kl_cov_frac", "must be in (0, 1]")
    check(0 < lr.clip_cov_frac <= 1, "learner.clip_cov_frac", "must be in (0, 1]")
    check(len(lr.clip_cov_bounds) == 2 and lr.clip_cov_bounds[0] < lr.clip_cov_bounds[1],
          "learner.clip_cov_bounds", "must be [lower, upper] with lower < upper")

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

    check(cfg.run.steps >= 0, "run.steps", "must be >= 0")
    check(cfg.run.eval_every >= 0, "run.eval_every", "must be >= 0")
    check(cfg.run.save_every >= 0, "run.save_every", "must be >= 0")
    check(c.rollout_workers >= 1, "cluster.rollout_workers", "must be >= 1")
    check(c.max_restarts >= 0, "cluster.max_restarts", "must be >= 0")
    for key in ("rollout_cpus", "rollout_gpus", "adversary_cpus", "adversary_gpus", "learner_cpus", "learner_gpus"):
        check(getattr(c, key) >= 0, f"cluster.{key}", "must be >= 0")
    if r.kv_cache_gb is not None and r.kv_cache_gb <= 0:
        problems.append(f"rollout.kv_cache_gb: must be > 0 or null (got {r.kv_cache_gb!r})")
    if r.max_model_len is not None and r.max_model_len < 1:
        problems.append(f"rollout.max_model_len: must be >= 1 or null (got {r.max_model_len!r})")
    check(c.weight_bucket_mb > 0, "cluster.weight_bucket_mb", "must be > 0")
    check(c.weight_sync_timeout_s > 0, "cluster.weight_sync_timeout_s", "must be > 0")

    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right under each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type = Config, prefix: str = "", obj: Any = None) -> str:
    """The config tree as text: `key: type = default  # doc`, one line per field (for --help)."""
    obj = obj if obj is not None else cls()
    docs = field_docs(cls)
    lines = []
    for f in fields(cls):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            lines.append(f"{key}:  # {docs.get(f.name, '')}")
            lines.append(describe(type(value), key + ".", value))
        else:
            t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            lines.append(f"  {key}: {t} = {value!r}  # {docs.get(f.name, '')}")
    return "\n".join(lines)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written into every run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
