"""`make compare`: GRPO, SaEI and the ablations on the embedded task, several seeds, one report.

    python -m cluster.compare [--seeds 0 1 2] [--configs grpo saei ...] [--out runs/compare] [key=value ...]

Each (config, seed) is one `python -m cluster.train` run in its own process (its own local Ray): the
typed defaults (the embedded task, as configs/default.yaml spells out), the named config file, then
the overrides. All runs share one synthetic data set and one bootstrapped policy under runs/. The report
(`<out>/report.md`) has one row per config: final greedy test accuracy and pass@k (mean +- std over
seeds), final clean / adversarial reward and entropy, selective entropy before / after the attack,
and seconds per step; `<out>/curves_*.png` overlay the configs' mean curves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from cluster.metrics import read_metrics, save_panel

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["grpo", "saei", "no_tsec", "random_tokens", "noise", "learn_on_clean"]
COLUMNS = [("eval/accuracy", "greedy acc"), ("eval/pass@k", "pass@k"), ("reward/clean", "reward clean"),
           ("reward/adversarial", "reward adv"), ("entropy/clean", "entropy clean"),
           ("entropy/adversarial", "entropy adv"), ("tsec/before", "TsEC before"), ("tsec/after", "TsEC after"),
           ("time/step_s", "s / step")]
CURVES = ["eval/accuracy", "entropy/clean", "reward/mean"]


def run_one(name: str, seed: int, out: Path, overrides: list[str]) -> Path:
    """One training run; returns its run folder (reused if a finished one is already there)."""
    root = out / f"{name}-seed{seed}"
    done = sorted(root.glob("*/summary.json"))
    if done:
        return done[-1].parent
    cmd = [sys.executable, "-m", "cluster.train", "--config", str(REPO / "configs" / f"{name}.yaml"),
           f"run.output_dir={root}", f"run.name={name}", f"run.seed={seed}", "logging.progress_bar=false",
           "cluster.dashboard=false",
           # every config starts from the same bootstrapped policy, whose accuracy the bootstrap logs
           "run.eval_before_train=false", *overrides]
    # the shared artefacts (data, bootstrapped policy) stay where default.yaml puts them
    cmd += ["model.path=runs/tiny_policy/bootstrap", "data.train_files=[runs/data/synthetic/train.parquet]",
            "data.test_files=[runs/data/synthetic/test.parquet]"]
    print(f"== {name} seed {seed}", flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    return sorted(root.glob("*/summary.json"))[-1].parent


def last_value(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return values[-1] if values else None


def report(results: dict[str, list[Path]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# SaEI-RL on the embedded task: GRPO, SaEI and ablations", "",
             f"Seeds per config: {max(len(v) for v in results.values())}. Final values (mean +- std over seeds); "
             "accuracy is greedy on the test split.", "",
             "| config | " + " | ".join(label for _, label in COLUMNS) + " |",
             "| --- |" + " --- |" * len(COLUMNS)]
    curves: dict[str, dict[str, list[tuple[list[int], list[float]]]]] = {k: {} for k in CURVES}
    for name, dirs in results.items():
        runs = [read_metrics(d / "metrics.jsonl") for d in dirs]
        cells = []
        for key, _ in COLUMNS:
            vals = [v for v in (last_value(r, key) for r in runs) if v is not None]
            cells.append(f"{np.mean(vals):.3f} +- {np.std(vals):.3f}" if vals else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for key in CURVES:
            for rows in runs:
                pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    curves[key].setdefault(name, []).append(tuple(map(list, zip(*pts))))
    lines.append("")
    for key in CURVES:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, series in curves[key].items():
            steps = series[0][0]
            same = [s for s in series if s[0] == steps]
            ax.plot(steps, np.mean([s[1] for s in same], axis=0), label=name)
        path = save_panel(fig, ax, key, out / f"curves_{key.replace('/', '_')}.png")
        plt.close(fig)
        lines.append(f"![{key}]({path.name})")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, key=value")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from cluster.bootstrap import ensure_data, ensure_policy
    from core.config import load_config

    shared = load_config(REPO / "configs" / "default.yaml", ["run.output_dir=runs"])
    ensure_data(shared)
    ensure_policy(shared)
    results = {name: [run_one(name, seed, out, args.overrides) for seed in args.seeds] for name in args.configs}
    path = report(results, out)
    print(path.read_text())
    print(f"report: {path}")
    (out / "runs.json").write_text(json.dumps({k: [str(d) for d in v] for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
