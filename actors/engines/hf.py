"""The transformers engine: `generate` batched with left padding; the CPU default and the reference.

Sampling is ours, not transformers': `_RowSampler`, a logits processor, draws every row's token from
that row's own `torch.Generator` (seeded by `sample_seed(request seed, sample index)`) and hands
`generate` logits that force the drawn token, so its greedy step takes it. transformers' sampler
draws all rows from one global stream, which would tie a request's samples to its batch neighbours.
The draw is an exponential race, `argmax(p / q)` with q ~ Exp(1) drawn for the whole vocabulary
(as vLLM draws): every step consumes the same random numbers whatever the probabilities, and the
drawn token changes under float noise only when two tokens' `p / q` nearly tie. An inverse-CDF draw
(`multinomial`) flips whenever the uniform lands near any of V cumulative boundaries, far more often
for a large vocabulary.

What holds exactly, and what only up to float noise (measured on CPU, sdpa, float32): the same call
twice gives bitwise equal results, and chunking (max_batch_requests) changes nothing. Batched with
other requests (other prompt lengths, other image sizes, so other left padding), the logits move by
float noise (~1e-6): the same tokens come out unless a draw is a near-tie at that scale (0 of 160
samples x 32 tokens differed in a check), and the log-probs agree to ~1e-6, as they agree with a
teacher-forced forward.

One request's n rows share one image preprocessing and one vision-tower forward: `generate` gets
each request's pixel_values once, and `_vision_once` hands the image's features to all its rows
(a 6-sample request costs one tower forward, not six). The tokens and log-probs are those of running
the tower per row (`share_vision=False`, transformers' own path) up to float noise.
"""

from __future__ import annotations

import contextlib
import gc
import time

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from actors.engines.base import (
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    check_sampling,
    check_state_dict,
    end_of_turn_ids,
    sample_seed,
)
from core import weights
from core.config import SamplingConfig
from core.policy import encode_prompts, load_policy, load_processor, vision_special_ids


class _RowSampler(LogitsProcessor):
    """Draws row r's next token from generator r; keeps the raw log-prob of every draw.

    seeds: one per row. banned: token ids never drawn ([K] int64). After `generate`, `logprobs()` is
    [rows, steps] float32: log_softmax of the unmodified logits at the drawn tokens.
    """

    def __init__(self, seeds: list[int], sampling: SamplingConfig, banned: torch.Tensor):
        self.seeds = seeds
        self.sampling = sampling
        self.banned = banned
        self.generators: list[torch.Generator] | None = None  # made on the logits' device at the first step
        self.steps: list[torch.Tensor] = []  # per step [rows] float32

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float()  # [rows, V]
        raw = logits.log_softmax(-1)
        logits = logits.clone()
        logits[:, self.banned.to(logits.device)] = -torch.inf
        s = self.sampling
        if s.temperature == 0:
            tokens = logits.argmax(-1)
        else:
            tokens = self._draw(self._filtered_probs(logits / s.temperature))
        self.steps.append(raw.gather(-1, tokens[:, None]).squeeze(-1))
        return torch.full_like(scores, -torch.inf).scatter_(-1, tokens[:, None], 0.0)

    def _filtered_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Top-k then top-p on [rows, V] tempered logits, as vLLM and transformers' warpers do; [rows, V] probs."""
        s = self.sampling
        if 0 < s.top_k < logits.shape[-1]:
            kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)  # ties with the k-th stay in
        if s.top_p < 1.0:
            # drop the least likely tokens while their total mass stays <= 1 - top_p; the top one always stays
            sorted_logits, order = logits.sort(-1)
            mass = sorted_logits.softmax(-1).cumsum(-1)
            drop = mass <= 1 - s.top_p
            drop[:, -1] = False
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -torch.inf))
        return logits.softmax(-1)

    def _draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of [rows, V] probs by an exponential race on the row's own generator."""
        if self.generators is None:
            self.generators = [torch.Generator(device=probs.device).manual_seed(s) for s in self.seeds]
        q = torch.empty_like(probs)
        for r, g in enumerate(self.generators):
            q[r].exponential_(generator=g)
        # exponential_ can return 0: 0/0 would be NaN, which argmax takes, handing out a banned token
        return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(-1)

    def logprobs(self, rows: int) -> torch.Tensor:
        return torch.stack(self.steps, 1).cpu() if self.steps else torch.zeros(rows, 0)


class _StopOnStrings(StoppingCriteria):
    """Ends a row once a stop string shows in the text of its last few generated tokens.

    Only an early exit: `HFEngine._finish` cuts every row at its first stop string anyway, so a
    string the window misses (a special token inside it) changes nothing but the time spent.
    """

    def __init__(self, tokenizer, stops: list[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_len = prompt_len
        # every token holds >= 1 byte, so a string of b bytes ends within the last b tokens (+1 for a split char)
        self.window = max(len(s.encode()) for s in stops) + 1

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


@contextlib.contextmanager
def _vision_once(model, grid: torch.Tensor, repeats: list[int]):
    """While `model.generate` runs: image j (grid [K, 3] int64, one row per distinct image) goes through
    the vision tower once and its features are handed to its repeats[j] rows, in row order.

    generate then gets the distinct images' pixel_values with the rows' image_grid_thw (which the rows
    need for their rotary positions). Every transformers 5 path encodes images through the base model's
    `get_image_features`, so that one method is wrapped, on this instance, for the call's duration.
    """
    base = model.model
    encode = base.get_image_features  # the class's method, bound

    def per_row(pixel_values, image_grid_thw=None, **kwargs):
        if image_grid_thw is not None and len(image_grid_thw) != sum(repeats):
            raise RuntimeError(f"_vision_once: {len(image_grid_thw)} image rows, expected {sum(repeats)}")
        out = encode(pixel_values, grid.to(pixel_values.device), **kwargs)
        out.pooler_output = tuple(f for f, k in zip(out.pooler_output, repeats) for _ in range(k))
        return out

    base.get_image_features = per_row
    try:
        yield
    finally:
        del base.get_image_features  # the class's method again


def _stop_end(text: str, stops: list[str]) -> int | None:
    """Index just past the stop string occurrence that ends first in `text`, or None."""
    ends = [i + len(s) for s in stops if (i := text.find(s)) >= 0]
    return min(ends) if ends else None


class HFEngine:
    """transformers `generate` over the policy folder `model_path` (see the module docstring)."""

    def __init__(self, model_path: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
                 attn_implementation: str | None = "sdpa", max_batch_requests: int = 64, share_vision: bool = True):
        """share_vision: one vision-tower forward per request, its features shared by the request's rows
        (False: one per row, transformers' own path; the reference the tests compare against)."""
        if max_batch_requests < 1:
            raise ValueError(f"max_batch_requests must be >= 1, got {max_batch_requests}")
        self.device = torch.device(device)
        self.model = load_policy(model_path, dtype=dtype, device=self.device, attn_implementation=attn_implementation)
        self.processor = load_processor(model_path)
        self.tokenizer = self.processor.tokenizer
        self.stop_ids = end_of_turn_ids(self.tokenizer, self.model.generation_config)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.banned = torch.tensor(vision_special_ids(self.model.config), dtype=torch.long)
        # generate() fills unset fields from the model's generation config: a checkpoint's repetition penalty or
        # top_k there would reshape the logits before _RowSampler sees them, so the engine's model has none
        self.model.generation_config = GenerationConfig(eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        self.max_batch_requests = max_batch_requests
        self.share_vision = share_vision
        self.last_stats = GenerationStats()

    @torch.no_grad()  # not inference_mode: tensors made here may later meet autograd
    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[list[GenerationResult]]:
        """Exactly `n` results per request, in request order (see actors.engines.base)."""
        check_sampling(sampling)
        t0 = time.perf_counter()
        stats = GenerationStats(requests=len(requests))
        out: list[list[GenerationResult]] = []
        for i in range(0, len(requests), self.max_batch_requests):
            out.extend(self._generate_chunk(requests[i:i + self.max_batch_requests], sampling, stats))
        stats.samples = sum(len(r) for r in out)
        stats.generated_tokens = sum(int(g.response_ids.numel()) for r in out for g in r)
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return out

    def _generate_chunk(self, requests: list[GenerationRequest], sampling: SamplingConfig,
                        stats: GenerationStats) -> list[list[GenerationResult]]:
        live = [r for r in requests if r.n > 0]
        if not live:
            return [[] for _ in requests]
        inputs, grid = self._rows(live)
        prompt_len = inputs["input_ids"].shape[1]
        stats.prompt_tokens += int(inputs["attention_mask"].sum())
        seeds = [sample_seed(r.seed, i) for r in live for i in range(r.n)]
        sampler = _RowSampler(seeds, sampling, self.banned)
        stopping = StoppingCriteriaList([_StopOnStrings(self.tokenizer, list(sampling.stop), prompt_len)]
                                        if sampling.stop else [])
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=sampling.max_new_tokens,
                                  eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        shared = _vision_once(self.model, grid, [r.n for r in live]) if self.share_vision else contextlib.nullcontext()
        with shared:
            seqs = self.model.generate(**inputs, generation_config=config,
                                       logits_processor=LogitsProcessorList([sampler]), stopping_criteria=stopping)
        generated = seqs[:, prompt_len:].cpu()  # [rows, steps]
        logprobs = sampler.logprobs(len(seeds))  # [rows, >= steps]
        results = iter([self._finish(generated[k], logprobs[k], sampling.stop) for k in range(len(seeds))])
        return [[next(results) for _ in range(r.n)] for r in requests]

    def _rows(self, requests: list[GenerationRequest]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Left-padded model inputs with request j repeated n_j times, each image preprocessed once, and
        the requests' image grids ([K, 3] int64). pixel_values hold each image once under share_vision
        (`_vision_once` repeats its features), once per row otherwise."""
        enc = encode_prompts(self.processor, [r.prompt for r in requests], [r.image for r in requests])
        n = torch.tensor([r.n for r in requests])
        rows = {k: enc[k].repeat_interleave(n, 0) for k in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                             "image_grid_thw")}
        rows["pixel_values"] = enc["pixel_values"]  # [patches, D]
        if not self.share_vision:
            per_image = torch.split(enc["pixel_values"], enc["image_grid_thw"].prod(-1).tolist())  # [patches_j, D]
            rows["pixel_values"] = torch.cat([p for p, k in zip(per_image, n.tolist()) for _ in range(k)])
        return {k: v.to(self.device) for k, v in rows.items()}, enc["image_grid_thw"]

    def _finish(self, ids: torch.Tensor, logprobs: torch.Tensor, stops: list[str]) -> GenerationResult:
        """One row's result from its generated ids ([steps] int64, padded after its end) and log-probs."""
        ids = ids.long()
        ends = torch.isin(ids, torch.tensor(self.stop_ids)).nonzero()
        finish = "length"
        if len(ends):  # keep the end-of-turn token, drop the padding generate put after it
            ids, finish = ids[:int(ends[0]) + 1], "stop"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = _stop_end(text, stops) if stops else None
        if cut is not None:
            # the fewest tokens whose text already holds a stop string: token prefixes decode to text prefixes
            lo, hi = 1, ids.numel()
            while lo < hi:
                mid = (lo + hi) // 2
                if _stop_end(self.tokenizer.decode(ids[:mid], skip_special_tokens=True), stops) is None:
                    lo = mid + 1
                else:
                    hi = mid
            ids, text, finish = ids[:lo], text[:cut], "stop"
        return GenerationResult(response_ids=ids, text=text, logprobs=logprobs[:ids.numel()].float().clone(),
                                finish_reason=finish)

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Replace every weight (a full state dict, Hugging Face names as `model.state_dict()` gives them).

        Checked before anything is copied: a missing, unexpected or misshaped key raises and leaves the
        weights as they were. Tied weights (embed_tokens / lm_head of the tiny policy) appear under both
        names and must be equal, as any state_dict gives them.
        """
        check_state_dict(named_tensors, {k: tuple(v.shape) for k, v in self.model.state_dict().items()})
        with torch.no_grad():
            self.model.load_state_dict(named_tensors, strict=True)

    def receive_weights(self, info: weights.GroupInfo, rank: int, own_host: str | None = None) -> int:
        """Replace every weight with a sync of the weight group `info` (this engine is its `rank`, its
        device on `own_host`, this node's address); returns the version received. A manifest that does
        not match the model raises and changes nothing."""
        self._wgroup = weights.join(getattr(self, "_wgroup", None), info, rank, own_host)
        version = weights.receive_into(self._wgroup, self.model.state_dict()).version
        self.received_fingerprint = self._wgroup.last_fingerprint
        return version

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
