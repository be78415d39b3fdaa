"""cluster.compare: its numbers (from metrics rows written by hand) and the inputs it hands every run."""

import json
from pathlib import Path

import pytest

from cluster.compare import mean_std, report, run_summary


def _rows(entropies: list[float], acc: tuple[float, float], tsec: tuple[float, float] | None = None) -> list[dict]:
    rows = [{"step": 0, "eval/accuracy": acc[0], "eval/pass@k": 0.5}]
    for step, ent in enumerate(entropies, start=1):
        row = {"step": step, "entropy/clean": ent, "reward/mean": 0.1 * step, "time/step_s": 1.0 + step}
        if tsec:
            row.update({"tsec/before": tsec[0], "tsec/after": tsec[1]})
        rows.append(row)
    rows.append({"step": len(entropies), "eval/accuracy": acc[1], "eval/pass@k": 0.75})
    return rows


def test_run_summary_takes_first_and_last_windows_and_the_evaluations():
    s = run_summary(_rows([1.0, 0.8, 0.6, 0.4, 0.2], (0.5, 0.7), (0.3, 0.36)), window=2)
    assert s["acc_before"] == 0.5 and s["acc_after"] == 0.7
    assert s["acc_gain"] == pytest.approx(0.2)
    assert s["pass_after"] == 0.75
    assert s["entropy_first"] == pytest.approx(0.9) and s["entropy_last"] == pytest.approx(0.3)
    assert s["entropy_change"] == pytest.approx(-0.6)
    assert (s["tsec_before"], s["tsec_after"]) == (0.3, 0.36)
    assert s["step_s"] == pytest.approx(4.5)  # median of steps 2-5: 3, 4, 5, 6


def test_run_summary_without_a_step0_evaluation_or_attack():
    rows = [r for r in _rows([1.0, 0.9], (0.5, 0.6)) if r["step"] != 0 or "eval/accuracy" not in r]
    s = run_summary(rows, window=5)
    assert s["acc_before"] is None and s["acc_gain"] is None and s["acc_after"] == 0.6
    assert s["tsec_before"] is None


def test_mean_std_is_over_present_values():
    assert mean_std([1.0, None, 3.0]) == (2.0, 1.0, 2)
    assert mean_std([None]) is None


def test_report_has_a_row_per_config_and_curves(tmp_path):
    results = {}
    for name, ents in (("grpo", [1.0, 0.5]), ("default", [1.0, 1.2])):
        dirs = []
        for seed in range(2):
            d = tmp_path / f"{name}-{seed}"
            d.mkdir()
            rows = _rows([e + 0.1 * seed for e in ents], (0.5, 0.6 + 0.1 * seed))
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            dirs.append(d)
        results[name] = dirs
    text = report(results, tmp_path, window=1).read_text()
    assert "| grpo | 0.500 +- 0.000 | 0.650 +- 0.050 | 0.150 +- 0.050 |" in text
    assert "- default: 0.600, 0.700" in text
    assert "n/a" in text  # no attack keys in these runs: the TsEC cells
    for key in ("entropy_clean", "eval_accuracy", "reward_mean"):
        assert (tmp_path / f"curves_{key}.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["default"][0]["entropy_change"] == pytest.approx(0.2)


def test_paired_difference_matches_steps():
    from cluster.compare import paired_difference

    a = [{"step": 1, "x": 1.0}, {"step": 2, "x": 3.0}, {"step": 3, "x": 5.0}]
    b = [{"step": 2, "x": 1.0}, {"step": 1, "x": 0.5}, {"step": 0, "x": 9.0}]
    assert paired_difference(a, b, "x") == [0.5, 2.0]


def _run_config(cmd: list[str]):
    """The config a `cluster.train` command of compare's would run with."""
    from core.config import load_config

    i = cmd.index("--config")
    return load_config(cmd[i + 1], cmd[i + 2:])


def test_user_model_and_data_overrides_reach_every_run(tmp_path):
    from cluster.compare import prepare_shared, train_command

    policy = tmp_path / "my_policy"
    policy.mkdir()
    (policy / "config.json").write_text("{}")  # a folder of the user's: used as it is, never rebuilt
    (tmp_path / "train.parquet").write_bytes(b"")
    user = [f"model.path={policy}", f"data.train_files=[{tmp_path}/train.parquet]",
            f"data.test_files=[{tmp_path}/train.parquet]", "data.build_synthetic=false"]
    pinned = prepare_shared(user, tmp_path / "shared")
    cfg = _run_config(train_command("grpo", 1, tmp_path / "out", user, pinned))
    assert cfg.model.path == str(policy)
    assert cfg.data.train_files == [str(tmp_path / "train.parquet")] == cfg.data.test_files
    assert cfg.run.seed == 1 and cfg.run.output_dir == str(tmp_path / "out")
    assert not (tmp_path / "shared").exists()  # nothing was built: the user's inputs were used


def test_a_synthetic_override_gets_its_own_shared_data(tmp_path):
    from cluster.compare import prepare_shared, train_command

    policy = tmp_path / "my_policy"
    policy.mkdir()
    (policy / "config.json").write_text("{}")
    base = [f"model.path={policy}", "data.synthetic.n_train=6", "data.synthetic.n_test=3"]
    first = prepare_shared(base, tmp_path / "shared")
    harder = prepare_shared([*base, "data.synthetic.difficulty=2"], tmp_path / "shared")
    assert first != harder
    cfg = _run_config(train_command("default", 0, tmp_path / "out", [*base, "data.synthetic.difficulty=2"], harder))
    data = Path(cfg.data.train_files[0]).parent
    assert data.parent == tmp_path / "shared" / "data" and data.name.startswith("synthetic-")
    assert json.loads((data / "built_with.json").read_text())["synthetic"]["difficulty"] == 2
    assert cfg.model.path == str(policy)


def test_per_run_keys_are_refused_with_the_option_to_use(capsys):
    from cluster.compare import main

    with pytest.raises(SystemExit) as err:
        main(["--configs", "grpo", "run.seed=3"])
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert "run.seed=3" in text and "--seeds" in text and "--out" in text
