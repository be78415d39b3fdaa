"""The typed config tree of SaEI-RL: one dataclass per section, the only defaults.

Each field's docstring (the string literal under it) is its documentation: `core.config.describe`
prints it for `--help-config`. Loading, overrides and checks live in core/config.py and
core/config_checks.py; import the tree from `core.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunConfig:
    name: str = "saei"
    """Run name; each run's folder is `<output_dir>/<name>-<date>-<time>` (e.g. `runs/saei-20250101-120000`,
    with `-2`, `-3`, ... when two runs start in the same second)."""
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
    """Hugging Face folder of the policy (Qwen2-VL or Qwen2.5-VL): a local path or a storage URI (s3://,
    gs://, file://), which every node fetches once into its cache. Nothing is fetched from a hub."""
    ship_max_gb: float = 2.0
    """A local `path` of at most this many GiB is packed into Ray's object store by the driver and
    unpacked once per node, so nodes that do not see the driver's disk get it; a bigger local folder
    must be at the same path on every node (a shared mount), else use a storage URI."""
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
    5 s instead of 26 and two actors scaled 1.33x instead of 0.89x; on GPU no, vLLM's default)."""
    max_batch_requests: int = 64
    """Most requests one engine call batches together (bounds memory of the HF engine)."""
    stream_chunk: int = 2
    """Prompts per rollout task in a training step: smaller streams clean samples to the adversary
    sooner, larger batches better in the engine."""


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
    embedded default's calibration (bench/attack_calibration.py): on the bootstrapped tiny policy the
    paper's 2/255 (kept in configs/saei.yaml and the 7B config) raised the selective entropy by 0.5% and
    32/255 by 10%, averaged over `make compare`'s 40 steps and 3 seeds (`make train`: 8.1-14.3% by seed)."""
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
    """AdamW learning rate (the embedded default, measured on the bootstrapped tiny policy: 1e-4 cost 20
    points of greedy test accuracy in 10 steps; real policies want about 1e-6, as configs/geo3k_* set)."""
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
    model.shared_prefix a micro-batch holds its prompts once each, so larger ones save more (README, "Step
    time": an update of the default batch, 96 responses, took 0.29 s at 24 and 0.23 s at 96 on 2 cores);
    48 is half the batch. Large policies on GPUs want a few (the 7B config: 4)."""
    epochs: int = 1
    """Passes over each step's batch (1 = on-policy; >1 uses the clipped ratio)."""
    num_workers: int = 1
    """Learner ranks as Ray actors (0: one worker in the driver process, for debugging)."""
    mixed_precision: str = "auto"
    """FSDP2 parameter dtype: auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many optimizer steps (0: constant lr from the start)."""
    gradient_checkpointing: bool = False
    """Recompute decoder-layer and vision-block activations in backward (less memory, one more forward)."""
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
    learner_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per learner rank, e.g. `{learner_node: 1}` (a node started with `ray start
    --resources='{"learner_node": 8}'`): each rank's bundle of the PACK placement group asks for them, so
    an ops team pins the learner to a kind of node. Empty: CPUs and GPUs only."""
    learner_accelerator_type: str | None = None
    """Ray accelerator type every learner rank's node must have (e.g. `A100`, `H100`; Ray's
    `accelerator_type` option); None: any."""
    rollout_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per rollout actor (see `learner_resources`); the actors spread over the nodes
    that have them."""
    rollout_accelerator_type: str | None = None
    """Ray accelerator type of each rollout actor's node (e.g. `L4`); None: any."""
    adversary_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources of the adversary actor (see `learner_resources`); it goes anywhere they fit."""
    adversary_accelerator_type: str | None = None
    """Ray accelerator type of the adversary's node; None: any."""
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
    sync_every_s: float = 30.0
    """When `run.output_dir` is not a local path: upload the driver's changed files (metrics.jsonl,
    TensorBoard events, config) to the run's storage folder after a step at most this often, in
    seconds; always at a checkpoint, a stop and the end. 0: after every step."""


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
