"""What the adversary costs a step: SaEI against vanilla GRPO at the same samples per prompt.

    python bench/step_overhead.py                    # default config, local Ray, CPU
    python bench/step_overhead.py --steps 6 key=value ...

One process, one local Ray cluster, one rollout pool, learner group and adversary; the two step kinds
alternate on the same prompts (SaEI: n_clean = n_adv = N/2 with the PGD attack; GRPO: n_clean = N,
n_adv = 0), so drift and noise hit both alike. Prints the median step time of each and, as its last
line, `saei_vs_grpo_step_ratio=<x>` (the goal: <= 1.10: the streamed attack hides behind generation).
The policy is the config's `model.path` (bootstrap it first: `make bootstrap`); `--random-policy` times a
tiny policy with random weights instead (both kinds then generate max_new_tokens every time, the same
work for both, but not the response lengths of a trained policy).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.pool import RolloutPool  # noqa: E402
from adversary.actor import create_adversary_actor  # noqa: E402
from cluster.bootstrap import ensure_data, load_split, policy_dir  # noqa: E402
from cluster.pipeline import Parts, saei_step  # noqa: E402
from cluster.train import init_ray  # noqa: E402
from core.config import load_config  # noqa: E402
from core.policy import build_tiny_policy, load_processor  # noqa: E402
from learner.group import LearnerGroup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/default.yaml"))
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each kind (after one warm-up each)")
    ap.add_argument("--random-policy", action="store_true",
                    help="time a tiny policy with random weights instead of the config's model.path")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, ["cluster.dashboard=false", "logging.progress_bar=false", *args.overrides])
    total = cfg.rollout.n_clean + cfg.rollout.n_adv
    ensure_data(cfg)
    tmp = tempfile.TemporaryDirectory()
    path = policy_dir(cfg) if cfg.model.build_tiny else Path(cfg.model.path)  # the cache of these settings
    if args.random_policy:
        path = build_tiny_policy(Path(tmp.name) / "tiny", arch=cfg.model.arch)
        print(f"policy: a tiny {cfg.model.arch} with random weights (--random-policy), not {cfg.model.path}")
    elif not (path / "config.json").exists():
        sys.exit(f"error: no policy at {path} (model.path={cfg.model.path}): bootstrap it first (`python -m "
                 "cluster.bootstrap` with the same config and overrides), or pass --random-policy to time one with "
                 "random weights")
    else:
        print(f"policy: {path}")
    prompts = load_split(cfg, load_processor(path), cfg.data.train_files, cfg.data.batch_size)

    ray = init_ray(cfg)
    saei_cfg = copy.deepcopy(cfg)
    saei_cfg.rollout.n_clean, saei_cfg.rollout.n_adv = total - total // 2, total // 2
    grpo_cfg = copy.deepcopy(cfg)
    grpo_cfg.rollout.n_clean, grpo_cfg.rollout.n_adv = total, 0
    learner = LearnerGroup(str(path), cfg)
    pool = RolloutPool(str(path), cfg)
    adversary = create_adversary_actor(str(path), cfg)
    ray.get(adversary.ready.remote())
    kinds = {"saei": Parts(saei_cfg, pool, learner, adversary), "grpo": Parts(grpo_cfg, pool, learner, None)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    step = 0
    for rep in range(args.steps + 1):
        for kind, parts in kinds.items():
            step += 1
            m = saei_step(parts, prompts, step, progress=0.0)
            if rep > 0:  # the first round warms up actors, allocators and caches
                times[kind].append(m["time/step_s"])
            print(f"{kind} step {step}: {m['time/step_s']:.2f} s (generate {m['time/generate_s']:.2f}, attack "
                  f"{m['time/attack_s']:.2f}, learn {m['time/learn_s']:.2f}, sync {m['time/sync_s']:.2f})", flush=True)
    saei, grpo = statistics.median(times["saei"]), statistics.median(times["grpo"])
    print(f"{len(prompts)} prompts x {total} samples, {cfg.rollout.sampling.max_new_tokens} new tokens, "
          f"{args.steps} timed steps each (median)")
    print(f"saei_step_s={saei:.3f}")
    print(f"grpo_step_s={grpo:.3f}")
    pool.shutdown()
    learner.shutdown()
    ray.shutdown()
    tmp.cleanup()
    print(f"saei_vs_grpo_step_ratio={saei / grpo:.3f}")


if __name__ == "__main__":
    main()
