"""Where a step's numbers go: metrics.jsonl, TensorBoard, Ray's metrics (Prometheus / dashboard), plots.

One `MetricsSink.log(step, metrics)` per step (and per evaluation) writes the same values to every
sink the `logging` config turns on. Ray metric names are the keys with `/` turned into `_` and a
`saei_` prefix; Ray's exporter adds `ray_`, so `entropy/clean` is scraped as
`ray_saei_entropy_clean{run="<run name>"}` (cluster/grafana_dashboard.json charts them).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

from core.config import LoggingConfig

log = logging.getLogger(__name__)

# Curves drawn at the end of a run: one PNG per panel, each line a metrics key.
PLOTS = {
    "reward": ("reward/clean", "reward/adversarial", "reward/mean"),
    "accuracy": ("accuracy/clean", "accuracy/adversarial", "eval/accuracy", "eval/pass@k"),
    "entropy": ("entropy/clean", "entropy/adversarial", "tsec/before", "tsec/after"),
    "time": ("time/step_s", "time/generate_s", "time/attack_s", "time/learn_s", "time/sync_s"),
}


def prometheus_name(key: str) -> str:
    """`entropy/clean` -> `saei_entropy_clean` (Prometheus allows [a-zA-Z0-9_:] only)."""
    return "saei_" + re.sub(r"[^a-zA-Z0-9_]", "_", key.replace("@", "_at_"))


def _finite(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _truncate_after(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (and drop a line a kill cut in half); atomic."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    os.replace(tmp, path)


class MetricsSink:
    """Writes each step's metrics to metrics.jsonl, TensorBoard and Ray gauges (as configured)."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, run_name: str = "saei", resume_after: int | None = None):
        """resume_after: the step of the checkpoint a resumed job starts from. Lines and TensorBoard
        events of later steps (written by the job that was stopped after that checkpoint) are dropped,
        so the run keeps one metrics file with every step once."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.run_name = run_name
        path = self.run_dir / "metrics.jsonl"
        if resume_after is not None and cfg.jsonl and path.exists():
            _truncate_after(path, resume_after)
        self.jsonl = open(path, "a") if cfg.jsonl else None  # noqa: SIM115
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_after is None else resume_after + 1
            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
        self.gauges: dict = {}
        self.counters: dict = {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One line for `step`; non-numeric or non-finite values are kept in JSON as null and skipped elsewhere."""
        clean = {k: _finite(v) for k, v in metrics.items()}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.cfg.ray_metrics:
            self._ray(step, clean)

    def _ray(self, step: int, metrics: dict[str, float | None]) -> None:
        import ray
        from ray.util.metrics import Counter, Gauge

        if not ray.is_initialized():
            return
        tags = {"run": self.run_name}
        for k, v in metrics.items():
            if v is None:
                continue
            if k not in self.gauges:
                self.gauges[k] = Gauge(prometheus_name(k), description=f"SaEI-RL {k}", tag_keys=("run",))
            self.gauges[k].set(v, tags=tags)
        for key, name, desc in (("rollout/generated_tokens", "saei_generated_tokens", "tokens generated"),
                                ("learner/tokens", "saei_learned_tokens", "tokens trained on")):
            if metrics.get(key):
                if key not in self.counters:
                    self.counters[key] = Counter(name, description=f"SaEI-RL {desc}", tag_keys=("run",))
                self.counters[key].inc(metrics[key], tags=tags)
        if "step" not in self.gauges:
            self.gauges["step"] = Gauge("saei_step", description="SaEI-RL training step", tag_keys=("run",))
        self.gauges["step"].set(step, tags=tags)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl (a torn last line from a killed run is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipped a line that is not JSON (a run killed mid-write?)", path)
    return rows


def plot_curves(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """PNG curves of reward, accuracy, entropy and time per step; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    written = []
    for panel, keys in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        drawn = 0
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=key)
                drawn += 1
        if drawn:
            written.append(save_panel(fig, ax, panel, out_dir / f"{panel}.png"))
        plt.close(fig)
    return written


def save_panel(fig, ax, title: str, path: Path) -> Path:
    """The house style of a curve panel (step on x, a legend), saved as PNG."""
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
