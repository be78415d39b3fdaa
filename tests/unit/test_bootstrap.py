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


def _variant(small_cfg, *overrides: str):
    return load_config(None, [f"run.output_dir={small_cfg.run.output_dir}", "data.synthetic.n_train=64",
                              "data.synthetic.n_test=12", *overrides])


def test_data_of_other_settings_go_to_a_keyed_folder(small_cfg, result, caplog):
    train, _ = bs.synthetic_paths(small_cfg)
    stamp = train.stat().st_mtime_ns
    harder = _variant(small_cfg, "data.synthetic.difficulty=1")
    with caplog.at_level("WARNING", logger="saei.caches"):
        bs.ensure_data(harder)
    keyed = bs.Path(harder.data.train_files[0]).parent
    assert keyed != train.parent and keyed.name.startswith("synthetic-") and (keyed / "test.parquet").exists()
    assert harder.data.test_files == [str(keyed / "test.parquet")]
    assert "synthetic.difficulty: 0 there, 1 here" in caplog.text and str(keyed) in caplog.text
    assert bs.caches.read_stamp(keyed)["synthetic"]["difficulty"] == 1
    assert bs.caches.read_stamp(train.parent)["synthetic"]["difficulty"] == 0
    assert train.stat().st_mtime_ns == stamp  # the other run's data are left as they were
    again = _variant(small_cfg, "data.synthetic.difficulty=1")
    keyed_stamp = (keyed / "train.parquet").stat().st_mtime_ns
    bs.ensure_data(again)  # the keyed folder is the cache of these settings from now on
    assert again.data.train_files == harder.data.train_files
    assert (keyed / "train.parquet").stat().st_mtime_ns == keyed_stamp
    same = _variant(small_cfg)
    bs.ensure_data(same)
    assert same.data.train_files == [str(train)]


def test_policy_of_other_data_goes_to_a_keyed_folder(small_cfg, result, caplog):
    weights = bs.Path(small_cfg.model.path) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert bs.policy_dir(_variant(small_cfg, "run.seed=5")) == bs.Path(small_cfg.model.path)  # RL seeds share it
    other = _variant(small_cfg, "data.synthetic.seed=3")
    quick = bs.BootstrapSettings(steps=2, batch_size=4, warmup=1, look_first=0, threads=1, max_new_tokens=4,
                                 eval_batch=12)
    with caplog.at_level("WARNING", logger="saei.caches"):
        path = bs.ensure_policy(other, quick, progress=False)
    assert path != bs.Path(small_cfg.model.path) and path.name.startswith("bootstrap-")
    assert other.model.path == str(path) and (path / "config.json").exists()
    assert "init_seed: 0 there, 3 here" in caplog.text and "train_data.0.synthetic.seed: 0 there, 3 here" in caplog.text
    assert weights.stat().st_mtime_ns == stamp
    built = bs.caches.read_stamp(path)
    assert built["bootstrap"]["steps"] == 2 and built["train_data"][0]["synthetic"]["seed"] == 3
    # the job asks for any warm-up of these data: the keyed folder answers, nothing is rebuilt
    again = _variant(small_cfg, "data.synthetic.seed=3")
    bs.ensure_data(again)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert bs.ensure_policy(again, progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
