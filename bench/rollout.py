"""Rollout throughput: the engines (transformers, vLLM) and pools of Ray actors around them, in one run.

    python bench/rollout.py                                        # tiny policy, HF and vLLM, CPU
    python bench/rollout.py --engines vllm --shape 3b --image-size 448 --new-tokens 256 --prompts 32

For each engine: generated tokens/s of (1) the engine called in this process, (2) a RolloutPool of 1
actor (the same engine behind Ray: task dispatch, object store, reward scoring), and (3) pools of 2
and 4 actors where the machine has the cores (CPU) or GPUs for them. Every configuration gets the
same requests (same prompts, images and seeds); median of `--repeats` after a warm-up call. Also the
seconds an engine takes to start. Prints, per engine, `pool_vs_engine_ratio_<engine>=` (goal >= 0.95)
and `pool_scaling_<engine>_<k>=` (k actors over 1), and with both engines `vllm_vs_hf_engine_ratio=`
and `vllm_vs_hf_pool_ratio=` (pools of 1 actor). `pool_vs_engine_ratio=` is the first engine's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.engines import GenerationRequest, make_engine  # noqa: E402
from actors.pool import RolloutPool, RolloutRequest  # noqa: E402
from bench.shapes import SHAPES, write_policy  # noqa: E402
from cluster.train import init_ray  # noqa: E402
from core.batch import Prompt  # noqa: E402
from core.config import load_config  # noqa: E402
from core.policy import chat_prompt, load_processor  # noqa: E402


def median_rate(fn, repeats: int) -> float:
    """Median tokens/s of `repeats` calls of fn() -> (seconds, tokens), after one warm-up call."""
    fn()
    rates = []
    for _ in range(repeats):
        seconds, tokens = fn()
        rates.append(tokens / seconds)
    return statistics.median(rates)


def bench_engine(kind: str, path: Path, args, device: str, prompts: list[Prompt]) -> dict:
    gpu = device == "cuda"
    cfg = load_config(None, [f"rollout.engine={kind}", f"rollout.sampling.max_new_tokens={args.new_tokens}",
                             "cluster.dashboard=false", "cluster.rollout_cpus=1", f"cluster.rollout_gpus={int(gpu)}",
                             "rollout.max_batch_requests=1024", "rollout.kv_cache_gb=0.5"])
    sampling = cfg.rollout.sampling
    processor = load_processor(path)
    bare = [GenerationRequest(chat_prompt(processor, p.problem, cfg.data.format_prompt), p.image, args.n, i)
            for i, p in enumerate(prompts)]
    t = time.perf_counter()
    engine = make_engine(str(path), cfg, device)
    start_s = time.perf_counter() - t

    def run_engine() -> tuple[float, int]:
        t = time.perf_counter()
        out = engine.generate(bare, sampling)
        return time.perf_counter() - t, sum(int(r.response_ids.numel()) for rs in out for r in rs)

    out = {"start_s": start_s, "engine": median_rate(run_engine, args.repeats), "pools": {}}
    engine.close()
    if gpu:
        torch.cuda.empty_cache()

    ray = init_ray(cfg)
    requests = [RolloutRequest(p, args.n, seed=i) for i, p in enumerate(prompts)]
    slots = torch.cuda.device_count() if gpu else (os.cpu_count() or 1)
    for k in (1, 2, 4):
        if k > min(args.max_actors, slots):
            break
        pool = RolloutPool(str(path), cfg, num_actors=k)

        def run_pool(pool: RolloutPool = pool) -> tuple[float, int]:
            t = time.perf_counter()
            res, _ = pool.generate(requests, sampling)
            return time.perf_counter() - t, sum(int(s.response_ids.numel()) for o in res for s in o)

        out["pools"][k] = median_rate(run_pool, args.repeats)
        pool.shutdown()
    ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=6, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=48, help="the default config's max_new_tokens")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-actors", type=int, default=4)
    ap.add_argument("--cache", default="/tmp/saei-bench")
    args = ap.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ("hf", "vllm") for e in engines):
        ap.error(f"--engines: choose from hf, vllm (got {args.engines!r})")
    torch.set_num_threads(1)
    path = write_policy(args.shape, Path(args.cache) / f"{args.shape}-{args.image_size}", args.image_size,
                        device=args.device)
    rng = np.random.default_rng(0)
    prompts = [Prompt(uid=f"bench:{i}", problem=f"<image>What is shown? ({i})", answer="0",
                      image=rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8))
               for i in range(args.prompts)]
    results = {e: bench_engine(e, path, args, args.device, prompts) for e in engines}

    print(f"policy {args.shape} on {args.device}, {args.prompts} prompts x {args.n} samples x "
          f"{args.new_tokens} new tokens, image {args.image_size}px, median of {args.repeats}")
    for e, r in results.items():
        print(f"[{e}] engine start:  {r['start_s']:10.1f} s")
        print(f"[{e}] bare engine:   {r['engine']:10.1f} tokens/s")
        for k, rate in r["pools"].items():
            print(f"[{e}] pool of {k} actor{'s' if k > 1 else ' '}: {rate:10.1f} tokens/s")
    for e, r in results.items():
        pools = r["pools"]
        for k, rate in pools.items():
            if k > 1:
                print(f"pool_scaling_{e}_{k}={rate / pools[1]:.3f}")
        print(f"pool_vs_engine_ratio_{e}={pools[1] / r['engine']:.3f}")
    if {"hf", "vllm"} <= set(results):
        print(f"vllm_vs_hf_engine_ratio={results['vllm']['engine'] / results['hf']['engine']:.3f}")
        print(f"vllm_vs_hf_pool_ratio={results['vllm']['pools'][1] / results['hf']['pools'][1]:.3f}")
    first = results[engines[0]]
    print(f"pool_vs_engine_ratio={first['pools'][1] / first['engine']:.3f}")


if __name__ == "__main__":
    main()
