"""The run's metric sinks and the data cursor (no Ray)."""

import json

from cluster.metrics import MetricsSink, plot_curves, prometheus_name, read_metrics
from cluster.train import Cursor
from core.config import LoggingConfig


def test_sink_writes_jsonl_and_tensorboard_and_plots(tmp_path):
    sink = MetricsSink(tmp_path, LoggingConfig(ray_metrics=False))
    for step in (1, 2, 3):
        sink.log(step, {"reward/clean": 0.1 * step, "reward/adversarial": 0.05 * step, "entropy/clean": 1.0 / step,
                        "tsec/before": None, "bad": float("nan")})
    sink.log(3, {"eval/accuracy": 0.5})
    sink.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 3]
    assert rows[1]["reward/clean"] == 0.2 and rows[0]["bad"] is None and rows[0]["tsec/before"] is None
    assert any((tmp_path / "tensorboard").iterdir())
    plots = plot_curves(tmp_path / "metrics.jsonl", tmp_path)
    assert {p.name for p in plots} == {"reward.png", "accuracy.png", "entropy.png"}
    assert all(p.stat().st_size > 1000 for p in plots)


def test_torn_last_line_is_skipped(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text(json.dumps({"step": 1, "x": 1.0}) + "\n" + '{"step": 2, "x"')
    assert read_metrics(f) == [{"step": 1, "x": 1.0}]


def test_prometheus_names_are_legal():
    assert prometheus_name("entropy/clean") == "saei_entropy_clean"
    assert prometheus_name("eval/pass@k") == "saei_eval_pass_at_k"


def test_cursor_covers_each_epoch_once_and_resumes_exactly():
    c = Cursor(10, 4, seed=3, shuffle=True)
    seen = [c.next() for _ in range(5)]  # 20 indices = 2 epochs
    flat = [i for b in seen for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # reshuffled per epoch
    a = Cursor(10, 4, seed=3, shuffle=True)
    a.next()
    b = Cursor(10, 4, seed=3, shuffle=True, state=json.loads(json.dumps(a.state())))
    assert [a.next() for _ in range(4)] == [b.next() for _ in range(4)]
    assert Cursor(3, 5, seed=0, shuffle=False).next() == [0, 1, 2]
