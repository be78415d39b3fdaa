from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from core.config import CHOICES, Config, ConfigError, all_keys, describe, field_docs, load_config, to_yaml

REPO = Path(__file__).resolve().parents[2]


def _error(overrides=None, yaml_text=None, tmp_path=None) -> str:
    path = None
    if yaml_text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_defaults_load_and_are_valid():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.rollout.n_clean == 6 and cfg.rollout.n_adv == 6
    assert cfg.adversary.step_size == pytest.approx(32 / 255)  # the tiny policy's calibration
    for paper in ("saei.yaml", "geo3k_qwen2_5_vl_7b.yaml"):  # the paper's EgAS: one step of 2/255
        adv = load_config(REPO / "configs" / paper).adversary
        assert adv.step_size == pytest.approx(2 / 255) and adv.steps == 1, paper
    assert cfg.adversary.tsec.band == pytest.approx([1 / 3, 2 / 3])
    # interpolation resolved against run.output_dir
    assert cfg.model.path == "runs/tiny_policy/bootstrap"
    assert load_config(None, ["run.output_dir=/x"]).data.train_files == ["/x/data/synthetic/train.parquet"]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(REPO / "configs" / name)


def test_default_yaml_spells_out_the_typed_defaults():
    # `make compare` and every config file build on the typed defaults: default.yaml must not drift
    from dataclasses import asdict

    typed, shipped = asdict(load_config(None, [])), asdict(load_config(REPO / "configs/default.yaml", []))
    typed["run"].pop("name"), shipped["run"].pop("name")
    assert shipped == typed


def test_yaml_then_overrides_win(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  n_clean: 3\n  n_adv: 2\nlearner:\n  lr: 0.5\n")
    cfg = load_config(p, ["rollout.n_adv=5"])
    assert (cfg.rollout.n_clean, cfg.rollout.n_adv, cfg.learner.lr) == (3, 5, 0.5)


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("rollout.n_cleen=3", "rollout.n_cleen", "rollout.n_clean"),
        ("rollout.sampling.temprature=0.5", "rollout.sampling.temprature", "rollout.sampling.temperature"),
        ("adversary.tsec.bnd=[0.1,0.2]", "adversary.tsec.bnd", "adversary.tsec.band"),
        ("rollout.lr=1e-3", "rollout.lr", "learner.lr"),  # right name, wrong section
    ],
)
def test_unknown_key_names_key_and_nearest(override, key, suggestion):
    msg = _error([override])
    assert f"unknown config key '{key}'" in msg
    assert f"did you mean '{suggestion}'" in msg


def test_unknown_key_in_yaml_names_file(tmp_path):
    msg = _error(yaml_text="learner:\n  lrr: 0.1\n", tmp_path=tmp_path)
    assert "learner.lrr" in msg and "c.yaml" in msg and "learner.lr" in msg


def test_unknown_key_without_near_match_has_no_suggestion():
    msg = _error(["zzzzqqq=1"])
    assert "unknown config key 'zzzzqqq'" in msg and "did you mean" not in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("learner.lr=fast", "learner.lr"),
        ("rollout.n_clean=six", "rollout.n_clean"),
        ("adversary.tsec.band=[0.1,high]", "adversary.tsec.band[1]"),
        ("logging.jsonl=maybe", "logging.jsonl"),
    ],
)
def test_wrong_type_names_key(override, key):
    msg = _error([override])
    assert f"config key '{key}'" in msg


def test_section_given_a_scalar_is_an_error():
    assert "rollout" in _error(["rollout=3"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["rollout.n_clean=0", "rollout.n_adv=0"], "rollout.n_clean + rollout.n_adv: must be > 0"),
        (["rollout.n_clean=1", "rollout.n_adv=0"], "at least 2"),
        (["adversary.eps=-0.1"], "adversary.eps: must be >= 0"),
        (["adversary.tsec.band=[0.5,1.5]"], "adversary.tsec.band"),
        (["adversary.tsec.band=[-0.1,0.5]"], "adversary.tsec.band"),
        (["adversary.tsec.band=[0.7,0.3]"], "adversary.tsec.band"),
        (["adversary.tsec.band=[0.3]"], "adversary.tsec.band"),
        (["adversary.step_size=0"], "adversary.step_size"),
        (["rollout.sampling.top_p=0"], "rollout.sampling.top_p"),
        (["adversary.kind=pdg"], "did you mean 'pgd'"),
        (["learner.aggregation=token_mean"], "learner.aggregation"),
        (["rollout.kv_cache_gb=0"], "rollout.kv_cache_gb"),
        (["rollout.max_model_len=0"], "rollout.max_model_len"),
        (["data.synthetic.families=[count,circles]"], "data.synthetic.families"),
        (["data.synthetic.image_size=100"], "data.synthetic.image_size"),
        (["rollout.n_clean=0", "rollout.n_adv=4"], "rollout.n_clean"),
        (["model.attn_implementation=flash_attention_2"], "model.shared_prefix: needs a kernel"),
        (["cluster.learner_threads=-1"], "cluster.learner_threads"),
    ],
)
def test_impossible_values_fail_before_start(overrides, needle):
    assert needle in _error(overrides)


def test_vllm_engine_runs_without_a_gpu():
    cfg = load_config(None, ["rollout.engine=vllm"])
    assert cfg.rollout.engine == "vllm" and cfg.cluster.rollout_gpus == 0


def test_several_problems_reported_together():
    msg = _error(["adversary.eps=-1", "learner.lr=-1"])
    assert "adversary.eps" in msg and "learner.lr" in msg


def test_noise_baseline_may_run_without_clean_samples():
    cfg = load_config(None, ["adversary.kind=noise", "rollout.n_clean=0", "rollout.n_adv=4"])
    assert cfg.rollout.n_adv == 4


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    msg = _error(yaml_text="run: [unclosed\n", tmp_path=tmp_path)
    assert "not valid YAML" in msg and "c.yaml" in msg


def test_bad_override_syntax():
    assert "key=value" in _error(["rollout.n_clean"])


def _walk(cls):
    yield cls
    for f in fields(cls):
        value = f.default_factory() if callable(f.default_factory) else None
        if is_dataclass(value):
            yield from _walk(type(value))


def test_every_field_has_a_docstring():
    for cls in _walk(Config):
        docs = field_docs(cls)
        missing = [f.name for f in fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_choices_name_real_keys_and_defaults_are_valid_choices():
    keys = set(all_keys())
    cfg = Config()
    for key, options in CHOICES.items():
        assert key in keys
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value in options


def test_describe_lists_every_leaf_key_with_doc():
    text = describe()
    for key in all_keys():
        assert key in text
    assert "Responses sampled per prompt on the clean image" in text


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["rollout.n_adv=2", "adversary.learn_on=clean"])
    p = tmp_path / "resolved.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg
