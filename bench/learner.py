"""Learner throughput against plain transformers on the same batch, measured in the same run.

    python bench/learner.py                                   # tiny policy on CPU
    python bench/learner.py --shape 3b --device cuda --image-size 448 --response-tokens 256 \\
        --prompts 2 --n 12 --micro-batch-size 8               # on a GPU host

Both sides do the same work per step: forward + backward of every sequence (prompt with its image,
then a response), micro-batches with gradient accumulation, one AdamW step.
- plain: the model's own forward (the image once per row, [B, L, V] logits), `dtype` weights.
- learner: `learner.worker.LearnerWorker.update` (FSDP2, fp32 master weights with bf16 compute on
  GPU, the vision tower once per image, the head only on response tokens, in chunks).
Prints tokens/s of each (tokens = non-padding tokens of all rows), `learner_vs_plain_ratio`, and on
CUDA the model FLOPs utilisation: 6 * (N_text * tokens + N_vision * patches of the distinct images)
over the measured time and the chip's dense bf16 peak (the vision tower's useful work is one pass
per image, whichever way a side computes it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shapes import SHAPES, write_policy  # noqa: E402
from core.batch import TrainBatch  # noqa: E402
from core.config import load_config  # noqa: E402
from core.policy import QWEN_SPECIAL_TOKENS, chat_prompt, encode_prompt_response, load_policy, load_processor  # noqa: E402
from learner.worker import LearnerWorker  # noqa: E402

# Dense bf16 peak FLOP/s (no sparsity) by device-name fragment.
_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAKS.items() if k in name), None)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_batch(prompts: int, n: int, response_tokens: int, image_size: int, tokenizer) -> TrainBatch:
    rng = np.random.default_rng(0)
    special = {tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special])  # no stray image pads
    rows = prompts * n
    return TrainBatch(
        problems=[f"<image>Question {k}: what is shown in the figure?" for k in range(prompts)],
        images=[rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(prompts)],
        responses=[torch.from_numpy(rng.choice(vocab, response_tokens)) for _ in range(rows)],
        context=torch.arange(prompts).repeat_interleave(n),
        advantages=torch.from_numpy(rng.normal(size=rows).astype(np.float32)),
    )


def plain_step_fn(path: Path, batch: TrainBatch, micro: int, device: str, dtype: torch.dtype, attn: str):
    model = load_policy(path, dtype=dtype, device=device, attn_implementation=attn).train()
    processor = load_processor(path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    texts = [chat_prompt(processor, batch.problems[c]) for c in batch.context]
    images = [batch.images[c] for c in batch.context]

    def step() -> None:
        total = batch.num_tokens
        for i in range(0, len(batch), micro):
            inputs, rmask = encode_prompt_response(processor, texts[i:i + micro], images[i:i + micro],
                                                   batch.responses[i:i + micro])
            inputs = {k: v.to(device) for k, v in inputs.items()}
            mask = rmask[:, 1:].to(device)
            logits = model(**inputs).logits[:, :-1].float()
            logp = logits.log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
            adv = batch.advantages[i:i + micro].to(device)[:, None]
            (-(logp * adv * mask).sum() / total).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (allocator, kernels, lazy init)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=2, help="distinct images (contexts) in the batch")
    ap.add_argument("--n", type=int, default=6, help="responses per image")
    ap.add_argument("--response-tokens", type=int, default=48)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, flash_attention_2)")
    ap.add_argument("--cache", default="/tmp/saei-bench", help="where the random policy folder is kept")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    path = write_policy(args.shape, Path(args.cache) / f"{args.shape}-{args.image_size}", args.image_size,
                        device=args.device, dtype=dtype)
    processor = load_processor(path)
    batch = make_batch(args.prompts, args.n, args.response_tokens, args.image_size, processor.tokenizer)
    texts = [chat_prompt(processor, batch.problems[c]) for c in batch.context]
    inputs, _ = encode_prompt_response(processor, texts, [batch.images[c] for c in batch.context], batch.responses)
    tokens = int(inputs["attention_mask"].sum())
    patches = int(inputs["image_grid_thw"][:: args.n].prod(-1).sum())  # one pass per distinct image

    model, plain_step = plain_step_fn(path, batch, args.micro_batch_size, args.device, dtype, args.attn)
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    n_text = sum(p.numel() for p in model.parameters()) - n_vision
    # matmul parameters per text token: the decoder and the head (tied or not); the input embedding is a lookup
    n_text_compute = sum(p.numel() for p in model.model.language_model.parameters()) - n_embed \
        + model.lm_head.weight.numel()
    t_plain = timed(plain_step, args.repeats, args.device)
    del model, plain_step
    if args.device == "cuda":
        torch.cuda.empty_cache()

    cfg = load_config(None, [f"learner.micro_batch_size={args.micro_batch_size}", f"model.attn_implementation={args.attn}",
                             "learner.lr=1e-6", f"cluster.learner_cpus={args.threads}",
                             f"cluster.learner_gpus={1 if args.device == 'cuda' else 0}"])
    worker = LearnerWorker(str(path), cfg, device=args.device)
    t_learner = timed(lambda: worker.update(batch), args.repeats, args.device)

    print(f"policy {args.shape} ({(n_text + n_vision) / 1e6:.1f}M params, text {n_text / 1e6:.1f}M incl. "
          f"{n_embed / 1e6:.1f}M embedding, vision {n_vision / 1e6:.1f}M) on {args.device}; "
          f"{args.prompts} images x {args.n} responses of {args.response_tokens} tokens, image {args.image_size}px, "
          f"micro-batch {args.micro_batch_size}, {tokens} tokens per step, median of {args.repeats}")
    print(f"plain transformers step: {t_plain * 1e3:10.1f} ms   {tokens / t_plain:10.1f} tokens/s")
    print(f"learner update:          {t_learner * 1e3:10.1f} ms   {tokens / t_learner:10.1f} tokens/s")
    peak = peak_flops(args.device)
    if peak:
        flops = 6 * (n_text_compute * tokens + n_vision * patches)
        print(f"plain_mfu={flops / t_plain / peak:.3f}")
        print(f"learner_mfu={flops / t_learner / peak:.3f}")
    print(f"plain_tokens_per_s={tokens / t_plain:.1f}")
    print(f"learner_tokens_per_s={tokens / t_learner:.1f}")
    print(f"learner_vs_plain_ratio={t_plain / t_learner:.3f}")


if __name__ == "__main__":
    main()
