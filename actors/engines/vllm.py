"""The vLLM engine (GPU hosts only): offline `vllm.LLM` with one image per prompt.

The only module that imports vllm, and only inside functions, so importing it on a CPU machine works.
It relies on what ../shared/gpu/smoke_vllm.py checked with vLLM 0.24 on an H100:
- a prompt is `{"prompt": text, "multi_modal_data": {"image": PIL image}}`, the chat-templated text
  holding one `<|vision_start|><|image_pad|><|vision_end|>` (vLLM expands the pad to the image's tokens);
- weights reach the workers through `collective_rpc` with a callable that calls the model's own
  `load_weights` (tensors travel as safetensors bytes: collective_rpc does not rebuild tensors), or
  through the IPC weight-transfer API when this process can hold them on the same GPU;
- after every weight update the prefix cache and the encoder cache must be reset, or KV blocks and
  ViT embeddings computed with the old weights are reused.

Sampling semantics (actors.engines.base): each of a request's n samples is its own vLLM request
(n=1) seeded by `sample_seed(seed, i)`, so it draws from its own generator; that also lets greedy
requests ask for n > 1, which vLLM refuses. The prompt is prefilled once per sample, cheap next to
decoding for RL-length responses (vLLM shares the preprocessed image through its processor cache).
The vision special tokens get a -1e4 logit bias (vLLM clamps only the OpenAI server's biases):
never sampled, and the returned log-probs are vLLM's raw ones (`logprobs_mode="raw_logprobs"`:
before bias, temperature and top-k/top-p), the same quantity a teacher-forced forward gives.
Samples are reproducible per engine, not across engines: vLLM's random streams are not ours.
"""

from __future__ import annotations

import gc
import os
import time

import torch

from actors.engines.base import (
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    check_sampling,
    check_state_dict,
    end_of_turn_ids,
    sample_seed,
)
from core.config import Config, SamplingConfig
from core.policy import load_processor, resolve_dtype, vision_special_ids

# Set (unless already set) before vllm is imported; its engine core and workers inherit them.
_VLLM_ENV = {
    "VLLM_USE_FLASHINFER_SAMPLER": "0",  # flashinfer is not in the GPU kit
    "TVM_FFI_DISABLE_TORCH_C_DLPACK": "1",  # xgrammar would compile a torch addon in every process
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # a callable through collective_rpc, IPC handles
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",  # this process touches CUDA (IPC sender)
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",  # local folders only
    "TOKENIZERS_PARALLELISM": "false",
}

_BANNED_BIAS = -1e4  # any finite value far below every logit: exp(-1e4) is 0 in float32


def _load_in_worker(worker, blob: bytes) -> int:
    """Runs inside every vLLM worker (sent by collective_rpc): load a safetensors blob of HF-named weights.

    The model's `load_weights` maps Hugging Face names to vLLM's and shards for tensor parallelism.
    """
    import safetensors.torch

    model = worker.model_runner.model
    device = next(model.parameters()).device
    weights = safetensors.torch.load(bytes(blob))
    loaded = model.load_weights((name, t.to(device)) for name, t in weights.items())
    torch.cuda.synchronize()
    return len(loaded) if loaded is not None else -1


def _without_aliases(named_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop names whose tensor is the very same memory as an earlier one (tied embed_tokens / lm_head).

    safetensors refuses shared tensors, and vLLM ties (and skips) lm_head itself when the config says so.
    """
    seen, out = set(), {}
    for name, t in named_tensors.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


class VLLMEngine:
    """`vllm.LLM` over the policy folder `model_path` (see the module docstring).

    weight_transfer: `rpc` (safetensors bytes through collective_rpc; any sender) or `ipc` (CUDA IPC
    handles; the fast path when the sender shares this process's GPU, see gpu/README.md).
    `llm_kwargs` go to `vllm.LLM` as they are (max_num_seqs, ...).
    """

    def __init__(self, model_path: str, dtype: str = "auto", gpu_memory_utilization: float = 0.4,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False, max_model_len: int | None = None,
                 seed: int = 0, weight_transfer: str = "rpc", **llm_kwargs):
        if weight_transfer not in ("rpc", "ipc"):
            raise ValueError(f"weight_transfer must be rpc or ipc, got {weight_transfer!r}")
        for k, v in _VLLM_ENV.items():
            os.environ.setdefault(k, v)
        from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig
        from vllm import LLM

        path = str(model_path)
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
        self.weight_transfer = weight_transfer
        kwargs = dict(model=path, dtype=str(resolve_dtype(dtype, "cuda")).removeprefix("torch."),
                      gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                      enforce_eager=enforce_eager, seed=seed, limit_mm_per_prompt={"image": 1, "video": 0},
                      logprobs_mode="raw_logprobs")
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if weight_transfer == "ipc":
            kwargs["weight_transfer_config"] = {"backend": "ipc"}
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        if weight_transfer == "ipc":
            self.llm.init_weight_transfer_engine({"init_info": {}})
        self.last_stats = GenerationStats()

    @classmethod
    def from_config(cls, model_path: str, cfg: Config) -> VLLMEngine:
        r = cfg.rollout
        return cls(model_path, dtype=cfg.model.dtype, gpu_memory_utilization=r.gpu_memory_utilization,
                   tensor_parallel_size=r.tensor_parallel_size, enforce_eager=r.enforce_eager, seed=cfg.run.seed)

    def _params(self, sampling: SamplingConfig, seed: int):
        from vllm import SamplingParams

        greedy = sampling.temperature == 0
        return SamplingParams(
            n=1, seed=seed, temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p, top_k=-1 if greedy or sampling.top_k <= 0 else sampling.top_k,
            max_tokens=sampling.max_new_tokens, stop=list(sampling.stop), include_stop_str_in_output=True,
            stop_token_ids=list(self.stop_ids), logprobs=1, skip_special_tokens=True,
            logit_bias={i: _BANNED_BIAS for i in self.banned})

    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[list[GenerationResult]]:
        """Exactly `n` results per request, in request order (see actors.engines.base)."""
        from PIL import Image

        check_sampling(sampling)
        t0 = time.perf_counter()
        prompts, params = [], []
        for r in requests:
            image = Image.fromarray(r.image)  # one PIL image shared by the request's n prompts
            for i in range(r.n):
                prompts.append({"prompt": r.prompt, "multi_modal_data": {"image": image}})
                params.append(self._params(sampling, sample_seed(r.seed, i)))
        outs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
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
        """Replace every weight (full state dict, Hugging Face names as `model.state_dict()` gives them)."""
        check_state_dict(named_tensors, self.expected)
        weights = _without_aliases(named_tensors)
        if self.weight_transfer == "ipc":
            self._send_ipc(weights)
        else:
            import safetensors.torch

            blob = safetensors.torch.save({k: v.detach().to("cpu").contiguous() for k, v in weights.items()})
            self.llm.collective_rpc(_load_in_worker, args=(blob,))
        # KV blocks and ViT embeddings cached under the old weights must not be reused
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.engine_core.reset_encoder_cache()

    def _send_ipc(self, weights: dict[str, torch.Tensor]) -> None:
        """CUDA IPC handles to the workers (the sender must hold the tensors on their GPU: copied here)."""
        import pickle

        import pybase64
        from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

        on_gpu = {k: v.detach().to("cuda").contiguous() for k, v in weights.items()}

        def send(info) -> None:  # the payload vLLM's own "http" send mode posts
            self.llm.update_weights({"update_info": dict(
                names=info.names, dtype_names=info.dtype_names, shapes=info.shapes, packed=info.packed,
                tensor_sizes=info.tensor_sizes,
                ipc_handles_pickled=pybase64.b64encode(pickle.dumps(info.ipc_handles)).decode())})

        self.llm.start_weight_update(is_checkpoint_format=True)
        IPCWeightTransferEngine.trainer_send_weights(iter(on_gpu.items()), {"send_mode": send})
        self.llm.finish_weight_update()
        del on_gpu
        torch.cuda.empty_cache()

    def close(self) -> None:
        """Shut the engine core down and free the GPU memory it held."""
        if self.llm is None:
            return
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        gc.collect()
        torch.cuda.empty_cache()
