"""`make compare`: GRPO, SaEI and the ablations on the embedded task, several seeds, one report.

    python -m cluster.compare [--seeds 0 1 2] [--configs grpo default ...] [--out runs/compare] [key=value ...]

Each (config, seed) is one `python -m cluster.train` run in its own process (its own local Ray): the
typed defaults (the embedded task, as configs/default.yaml spells out), the named config file, then
the overrides. All runs share one data set and one bootstrapped policy (under `--shared`, runs/ by
default, built with the overrides applied: a `model.path` or `data.*` override is what every run
uses), and each evaluates that policy before its first step. `run.output_dir`, `run.name` and
`run.seed` are compare's to set (--out, --seeds) and refused as overrides. The report (`<out>/report.md`) has, per config, mean +-
std over seeds of: greedy test accuracy before and after and its change, pass@k, the policy entropy
of the first and last `--window` steps, selective entropy before / after the attack, and seconds per
step; then each seed's final accuracy; `<out>/curves_*.png` draw each config's mean curve with a band
of +- one standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cluster.metrics import read_metrics, save_panel

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["grpo", "default", "saei", "no_tsec", "random_tokens", "noise", "learn_on_clean"]
LEGEND = {
    "grpo": "vanilla GRPO, 12 clean samples per prompt",
    "default": "SaEI as `make train` runs it: 6 clean + 6 adversarial, PGD step 32/255 (calibrated for the tiny policy)",
    "saei": "SaEI with the paper's step, 2/255",
    "no_tsec": "SaEI (32/255) whose attack raises the entropy of all response tokens",
    "random_tokens": "SaEI (32/255) whose attack raises the entropy of a random third of the tokens",
    "noise": "NoisyRollout-style Gaussian noise instead of the attack",
    "learn_on_clean": "SaEI (32/255), adversarial samples trained on conditioned on the clean image",
}
CURVES = ["entropy/clean", "eval/accuracy", "reward/mean"]


PER_RUN = ("run.output_dir", "run.name", "run.seed")  # compare sets these for each run (--out, --seeds)


def prepare_shared(overrides: list[str], shared_dir: str | Path = "runs") -> list[str]:
    """Build (or find) the data and the bootstrapped policy that every run shares, with the user's
    overrides applied (their `model.path` / `data.*` win; a synthetic setting such as
    `data.synthetic.difficulty` gets its own cached data and policy: cluster.caches), and return the
    overrides that pin every run to them (absolute paths: the runs start in the repository)."""
    from cluster.bootstrap import ensure_data, ensure_policy
    from core.config import load_config

    shared = load_config(REPO / "configs" / "default.yaml", [*overrides, f"run.output_dir={shared_dir}"])
    ensure_data(shared)  # may point the data paths at a folder keyed by the synthetic settings
    policy = ensure_policy(shared)

    def files(paths: list[str]) -> str:
        return "[" + ",".join(str(Path(f).resolve()) for f in paths) + "]"

    return [f"model.path={Path(policy).resolve()}", f"data.train_files={files(shared.data.train_files)}",
            f"data.test_files={files(shared.data.test_files)}"]


def train_command(name: str, seed: int, root: Path, overrides: list[str], pinned: list[str]) -> list[str]:
    """The `cluster.train` command of one run: its config file, the per-run keys, the user's overrides,
    then the shared inputs (`pinned`, from prepare_shared: derived from those same overrides)."""
    return [sys.executable, "-m", "cluster.train", "--config", str(REPO / "configs" / f"{name}.yaml"),
            f"run.output_dir={root}", f"run.name={name}", f"run.seed={seed}", "logging.progress_bar=false",
            "cluster.dashboard=false", *overrides, *pinned]


def run_one(name: str, seed: int, out: Path, overrides: list[str], pinned: list[str]) -> Path:
    """One training run; returns its run folder (reused if a finished one is already there)."""
    root = out / f"{name}-seed{seed}"
    done = sorted(root.glob("*/summary.json"))
    if done:
        return done[-1].parent
    cmd = train_command(name, seed, root, overrides, pinned)
    print(f"== {name} seed {seed}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    print(f"== {name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return sorted(root.glob("*/summary.json"))[-1].parent


def run_summary(rows: list[dict], window: int) -> dict[str, float | None]:
    """One run's numbers from its metrics.jsonl rows: accuracy before (step 0) and after (last
    evaluation), pass@k after, mean clean entropy of the first and of the last `window` training
    steps, mean TsEC before / after the attack, and the median step time after step 1."""
    steps = [r for r in rows if r.get("entropy/clean") is not None]
    evals = [r for r in rows if r.get("eval/accuracy") is not None]

    def mean(rs: list[dict], key: str) -> float | None:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    before = [r for r in evals if r["step"] == 0]
    times = [r["time/step_s"] for r in rows if r.get("time/step_s") is not None and r["step"] > 1]
    out = {
        "acc_before": before[0]["eval/accuracy"] if before else None,
        "acc_after": evals[-1]["eval/accuracy"] if evals and evals[-1]["step"] > 0 else None,
        "pass_after": evals[-1].get("eval/pass@k") if evals and evals[-1]["step"] > 0 else None,
        "entropy_first": mean(steps[:window], "entropy/clean"),
        "entropy_last": mean(steps[-window:], "entropy/clean"),
        "tsec_before": mean(steps, "tsec/before"),
        "tsec_after": mean(steps, "tsec/after"),
        "step_s": float(np.median(times)) if times else None,
    }
    out["acc_gain"] = (out["acc_after"] - out["acc_before"]
                       if out["acc_after"] is not None and out["acc_before"] is not None else None)
    out["entropy_change"] = (out["entropy_last"] - out["entropy_first"]
                             if out["entropy_last"] is not None and out["entropy_first"] is not None else None)
    return out


def mean_std(values: list[float | None]) -> tuple[float, float, int] | None:
    """(mean, population std, n) of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    return (float(np.mean(vals)), float(np.std(vals)), len(vals)) if vals else None


def paired_difference(rows: list[dict], base: list[dict], key: str) -> list[float]:
    """rows[key] - base[key] at every step both runs logged it, in step order (training steps only)."""
    theirs = {r["step"]: r[key] for r in base if r.get(key) is not None and r["step"] > 0}
    return [r[key] - theirs[r["step"]] for r in sorted(rows, key=lambda r: r["step"])
            if r.get(key) is not None and r["step"] in theirs]


COLUMNS = [("acc_before", "acc before"), ("acc_after", "acc after"), ("acc_gain", "acc change"),
           ("pass_after", "pass@k after"), ("entropy_first", "entropy first"), ("entropy_last", "entropy last"),
           ("entropy_change", "entropy change"), ("tsec_before", "TsEC before"), ("tsec_after", "TsEC after"),
           ("step_s", "s / step")]


def report(results: dict[str, list[Path]], out: Path, window: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: [read_metrics(d / "metrics.jsonl") for d in dirs] for name, dirs in results.items()}
    summaries = {name: [run_summary(rows, window) for rows in rs] for name, rs in runs.items()}
    seeds = max(len(v) for v in results.values())
    lines = ["# SaEI-RL on the embedded task: GRPO, SaEI and ablations", "",
             f"Seeds per config: {seeds}; mean +- std over seeds (population std). Accuracy: greedy, on the "
             f"200-prompt test split, before the first step and after the last; entropy: the policy's mean "
             f"per-token entropy on the clean samples, averaged over the first and the last {window} steps; "
             "TsEC: the attacked tokens' mean entropy before / after the attack, over the run.", "",
             "| config | " + " | ".join(label for _, label in COLUMNS) + " |",
             "| --- |" + " --- |" * len(COLUMNS)]
    for name, sums in summaries.items():
        cells = []
        for key, _ in COLUMNS:
            ms = mean_std([s[key] for s in sums])
            cells.append(f"{ms[0]:.3f} +- {ms[1]:.3f}" if ms else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "grpo" in runs:
        # every config sees the same prompts at the same step for a given seed (the data cursor follows
        # run.seed), so the difference to GRPO at equal (seed, step) cancels the batch-to-batch swings
        lines += ["", f"Clean-sample entropy minus GRPO's at the same seed and step (same prompts), mean over "
                  f"all steps and over the last {window}; mean +- std over seeds:", ""]
        for name, rs in runs.items():
            if name == "grpo":
                continue
            diffs = [paired_difference(rows, base, "entropy/clean") for rows, base in zip(rs, runs["grpo"])]
            ms_all = mean_std([float(np.mean(d)) if d else None for d in diffs])
            ms_last = mean_std([float(np.mean(d[-window:])) if d else None for d in diffs])
            if ms_all and ms_last:
                lines.append(f"- {name}: all steps {ms_all[0]:+.3f} +- {ms_all[1]:.3f}; last {window} "
                             f"{ms_last[0]:+.3f} +- {ms_last[1]:.3f}")
    lines += ["", "Final greedy accuracy per seed:", ""]
    for name, sums in summaries.items():
        accs = ", ".join("n/a" if s["acc_after"] is None else f"{s['acc_after']:.3f}" for s in sums)
        lines.append(f"- {name}: {accs}")
    lines += ["", "Configs:", ""] + [f"- `{name}`: {LEGEND.get(name, 'configs/' + name + '.yaml')}"
                                     for name in results] + [""]
    for key in CURVES:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for name, rs in runs.items():
            series = [{r["step"]: r[key] for r in rows if r.get(key) is not None} for rows in rs]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not steps:
                continue
            values = np.array([[s[k] for k in steps] for s in series])  # [seeds, steps]
            mean, std = values.mean(0), values.std(0)
            line, = ax.plot(steps, mean, label=name, marker="o" if len(steps) < 6 else None, markersize=3)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.12)
        path = save_panel(fig, ax, f"{key} (mean +- std over seeds)", out / f"curves_{key.replace('/', '_')}.png")
        plt.close(fig)
        lines.append(f"![{key}]({path.name})")
    if "grpo" in runs and len(runs) > 1:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for name, rs in runs.items():
            if name == "grpo":
                continue
            diffs = [paired_difference(rows, base, "entropy/clean") for rows, base in zip(rs, runs["grpo"])]
            n = min(len(d) for d in diffs)
            if n == 0:
                continue
            values = np.array([d[:n] for d in diffs])  # [seeds, steps]
            steps = np.arange(1, n + 1)
            line, = ax.plot(steps, values.mean(0), label=name)
            ax.fill_between(steps, values.mean(0) - values.std(0), values.mean(0) + values.std(0),
                            color=line.get_color(), alpha=0.12)
        ax.axhline(0.0, color="black", linewidth=0.8)
        path = save_panel(fig, ax, "entropy/clean minus GRPO's (same seed, step, prompts)",
                          out / "curves_entropy_minus_grpo.png")
        plt.close(fig)
        lines.append(f"![entropy minus GRPO]({path.name})")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--window", type=int, default=5, help="steps averaged for the first / last entropy")
    parser.add_argument("--shared", default="runs", help="folder of the data and the bootstrapped policy that all "
                        "runs share (cached there, keyed by their settings)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, key=value")
    args = parser.parse_args(argv)
    missing = [n for n in args.configs if not (REPO / "configs" / f"{n}.yaml").is_file()]
    if missing:
        parser.error(f"no such config: {', '.join(f'configs/{n}.yaml' for n in missing)}")
    per_run = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") in PER_RUN]
    if per_run:
        parser.error(f"{', '.join(per_run)}: compare sets {', '.join(PER_RUN)} for each run; use --out for the "
                     "folder, --seeds for the seeds (the name is the config's)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pinned = prepare_shared(args.overrides, args.shared)
    print("shared inputs: " + " ".join(pinned), flush=True)
    results = {name: [run_one(name, seed, out, args.overrides, pinned) for seed in args.seeds]
               for name in args.configs}
    path = report(results, out, args.window)
    print(path.read_text())
    print(f"report: {path}  ({time.perf_counter() - t0:.0f} s in all)")
    (out / "runs.json").write_text(json.dumps({k: [str(d) for d in v] for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
