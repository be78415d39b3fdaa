"""The supervised bootstrap, run for real on a small slice of the synthetic task."""

import json

import pytest
import torch

from cluster import bootstrap as bs
from core import synthetic
from core.config import load_config
from core.policy import load_policy, load_processor


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("boot")
    return load_config(None, [f"run.output_dir={root}", "data.synthetic.n_train=64", "data.synthetic.n_test=12"])


@pytest.fixture(scope="module")
def result(small_cfg):
    # a smoke run of the training loop: a high lr shows the loss falling in 40 steps; 10 of them count-only
    settings = bs.BootstrapSettings(steps=40, batch_size=8, warmup=5, lr=2e-3, look_first=10, threads=1,
                                    max_new_tokens=16, eval_batch=12)
    return bs.bootstrap(small_cfg, settings, progress=False)


def test_bootstrap_writes_a_loadable_trained_policy(small_cfg, result):
    out = small_cfg.model.path
    assert result.path == out and result.steps == 40 and result.n_test == 12
    info = json.loads((bs.Path(out) / "bootstrap.json").read_text())
    assert info["accuracy"] == result.accuracy and 0.0 <= info["accuracy"] <= 1.0
    assert set(info["accuracy_by_family"]) <= set(synthetic.FAMILIES)
    assert not bs.Path(out + ".tmp").exists()
    trained = load_policy(out).state_dict()
    init = load_policy(bs.Path(out).parent / "init").state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in trained)
    load_processor(out)  # the processor travels with the weights


def test_bootstrap_loss_falls(result):
    # a random policy starts near ln(vocab) (about 6.5); 40 steps of supervision must cut that deeply
    assert result.initial_loss > 4.0
    assert result.final_loss < 0.5 * result.initial_loss, (result.initial_loss, result.final_loss)


def test_synthetic_data_rendered_once(small_cfg, result):
    train, test = bs.synthetic_paths(small_cfg)
    assert train.exists() and test.exists()
    mtime = train.stat().st_mtime_ns
    bs.ensure_data(small_cfg)
    assert train.stat().st_mtime_ns == mtime


def test_ensure_policy_reuses_the_cache(small_cfg, result):
    stamp = (bs.Path(small_cfg.model.path) / "model.safetensors").stat().st_mtime_ns
    assert bs.ensure_policy(small_cfg, progress=False) == bs.Path(small_cfg.model.path)
    assert (bs.Path(small_cfg.model.path) / "model.safetensors").stat().st_mtime_ns == stamp


def test_missing_policy_without_build_is_a_clear_error(tmp_path):
    cfg = load_config(None, [f"model.path={tmp_path}/none", "model.build_tiny=false"])
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/none"):
        bs.ensure_policy(cfg)


def test_cli_help_config_and_bad_key(capsys):
    assert bs.main(["--help-config"]) == 0
    assert "rollout.n_clean" in capsys.readouterr().out
    assert bs.main(["rollout.n_cleen=2"]) == 2
    assert "did you mean 'rollout.n_clean'" in capsys.readouterr().err
