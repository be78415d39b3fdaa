"""Rollout throughput: the pool of Ray actors against the bare engine on the same requests.

    python bench/rollout.py                                   # tiny policy, HF engine, CPU
    python bench/rollout.py --shape 3b --engine vllm --image-size 448 --new-tokens 256 --prompts 32

Measures generated tokens/s of (1) the engine called in this process, (2) a RolloutPool of 1 actor
(the same engine behind Ray: task dispatch, object store, reward scoring), and (3) pools of 2 and 4
actors where the machine has the cores (CPU) or GPUs for them. Every configuration generates the
same requests (same seeds, so the same tokens); median of `--repeats`. Prints
`pool_vs_engine_ratio` (goal >= 0.95) and `pool_scaling_<k>=` (tokens/s of k actors over 1 actor).
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
from actors.rollout import RolloutPool, RolloutRequest  # noqa: E402
from bench.shapes import SHAPES, write_policy  # noqa: E402
from cluster.train import init_ray  # noqa: E402
from core.batch import Prompt  # noqa: E402
from core.config import load_config  # noqa: E402
from core.policy import chat_prompt, load_processor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=6, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=48, help="the default config's max_new_tokens")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-actors", type=int, default=4)
    ap.add_argument("--cache", default="/tmp/saei-bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gpu = args.engine == "vllm"
    path = write_policy(args.shape, Path(args.cache) / f"{args.shape}-{args.image_size}", args.image_size,
                        device="cuda" if gpu else "cpu")
    cfg = load_config(None, [f"rollout.engine={args.engine}", f"rollout.sampling.max_new_tokens={args.new_tokens}",
                             "cluster.dashboard=false", "cluster.rollout_cpus=1",
                             f"cluster.rollout_gpus={1 if gpu else 0}", "rollout.max_batch_requests=1024"])
    processor = load_processor(path)
    rng = np.random.default_rng(0)
    prompts = [Prompt(uid=f"bench:{i}", problem=f"<image>What is shown? ({i})", answer="0",
                      image=rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8))
               for i in range(args.prompts)]
    requests = [RolloutRequest(p, args.n, seed=i) for i, p in enumerate(prompts)]
    sampling = cfg.rollout.sampling

    engine = make_engine(str(path), cfg, "cuda" if gpu else "cpu")
    bare = [GenerationRequest(chat_prompt(processor, p.problem, cfg.data.format_prompt), p.image, args.n, i)
            for i, p in enumerate(prompts)]

    def run_engine() -> tuple[float, int]:
        t = time.perf_counter()
        out = engine.generate(bare, sampling)
        return time.perf_counter() - t, sum(int(r.response_ids.numel()) for rs in out for r in rs)

    def median_rate(fn) -> float:
        fn()  # warm-up
        rates = []
        for _ in range(args.repeats):
            seconds, tokens = fn()
            rates.append(tokens / seconds)
        return statistics.median(rates)

    engine_rate = median_rate(run_engine)
    engine.close()
    if gpu:
        torch.cuda.empty_cache()

    ray = init_ray(cfg)
    slots = torch.cuda.device_count() if gpu else (os.cpu_count() or 1)
    rates = {}
    for k in (1, 2, 4):
        if k > min(args.max_actors, slots):
            break
        pool = RolloutPool(str(path), cfg, num_actors=k)

        def run_pool(pool: RolloutPool = pool) -> tuple[float, int]:
            t = time.perf_counter()
            out, _ = pool.generate(requests, sampling)
            return time.perf_counter() - t, sum(int(s.response_ids.numel()) for o in out for s in o)

        rates[k] = median_rate(run_pool)
        pool.shutdown()
    ray.shutdown()

    print(f"policy {args.shape}, engine {args.engine}, {args.prompts} prompts x {args.n} samples x "
          f"{args.new_tokens} new tokens, image {args.image_size}px, median of {args.repeats}")
    print(f"bare engine:      {engine_rate:10.1f} tokens/s")
    for k, r in rates.items():
        print(f"pool of {k} actor{'s' if k > 1 else ' '}: {r:10.1f} tokens/s")
    for k, r in rates.items():
        if k > 1:
            print(f"pool_scaling_{k}={r / rates[1]:.3f}")
    print(f"pool_vs_engine_ratio={rates[1] / engine_rate:.3f}")


if __name__ == "__main__":
    main()
