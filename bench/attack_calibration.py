"""How far one EgAS attack moves the selective entropy (TsEC) of a policy, per PGD step size and steps.

    python bench/attack_calibration.py                      # runs/tiny_policy/bootstrap on runs/data/synthetic
    python bench/attack_calibration.py --policy DIR --data FILE.parquet --prompts 16

For each setting it attacks the same prompts (n1 = 6 responses sampled from the policy) and prints the
mean TsEC before and after, the gain (after / before - 1, of the means and per prompt) and the time:
the numbers behind adversary.step_size's default for the embedded policy (32/255) versus the paper's
2/255, which this tiny policy barely reacts to. Without a bootstrapped policy it says so and exits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.engines.base import GenerationRequest  # noqa: E402
from actors.engines.hf import HFEngine  # noqa: E402
from adversary.attack import Attacker  # noqa: E402
from cluster.bootstrap import load_split  # noqa: E402
from core.config import load_config  # noqa: E402
from core.policy import chat_prompt, load_policy, load_processor  # noqa: E402

SETTINGS = [(1, 2), (1, 8), (1, 16), (1, 32), (3, 8), (3, 16)]  # (PGD steps, step size in 1/255)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="runs/tiny_policy/bootstrap")
    parser.add_argument("--data", default="runs/data/synthetic/train.parquet")
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()
    if not (Path(args.policy) / "config.json").exists() or not Path(args.data).exists():
        print(f"no bootstrapped policy at {args.policy} (or no data at {args.data}): run `make train` or "
              "`python -m cluster.bootstrap` first")
        return 0
    torch.set_num_threads(1)
    cfg = load_config(None, [])
    processor = load_processor(args.policy)
    model = load_policy(args.policy, dtype="float32")
    prompts = load_split(cfg, processor, [args.data], args.prompts)
    engine = HFEngine(args.policy, dtype="float32")
    reqs = [GenerationRequest(prompt=chat_prompt(engine.processor, p.problem, cfg.data.format_prompt), image=p.image,
                              n=cfg.rollout.n_clean, seed=i) for i, p in enumerate(prompts)]
    items = [(p, [r.response_ids for r in group]) for p, group in zip(prompts, engine.generate(reqs, cfg.rollout.sampling))]
    for steps, a in SETTINGS:
        adv = cfg.adversary
        adv.step_size, adv.steps, adv.eps = a / 255, steps, None
        attacker = Attacker(model, processor, adv, cfg.data.format_prompt)
        t0 = time.perf_counter()
        results = attacker.attack_many(items)
        seconds = time.perf_counter() - t0
        before = np.array([r.metrics["tsec/before"] for r in results])
        after = np.array([r.metrics["tsec/after"] for r in results])
        print(f"T={steps} a={a}/255  tsec {before.mean():.4f} -> {after.mean():.4f}  "
              f"gain_of_means={after.mean() / before.mean() - 1:+.2%}  mean_gain={np.mean(after / before - 1):+.2%}  "
              f"{seconds / len(items):.3f} s per prompt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
