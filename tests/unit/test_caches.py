"""cluster.caches: a cache folder is reused only by the settings that built it; others get a keyed sibling."""

import logging
from pathlib import Path

import pytest

from cluster import caches


def _build(folder, settings):
    folder.mkdir()
    (folder / "done").write_text("x")
    caches.write_stamp(folder, settings)


def _done(folder):
    return (folder / "done").exists()


def test_free_or_matching_folder_is_used_as_it_is(tmp_path):
    path = tmp_path / "data"
    assert caches.resolve(path, {"seed": 0}, "data", _done) == path
    _build(path, {"seed": 0, "size": 8})
    assert caches.resolve(path, {"seed": 0}, "data", _done) == path  # `size` left out: anything goes
    assert caches.resolve(path, {"seed": 0, "size": 8}, "data", _done) == path


def test_other_settings_get_a_keyed_sibling_and_find_it_again(tmp_path, caplog):
    path = tmp_path / "data"
    _build(path, {"seed": 0, "nested": {"difficulty": 0}})
    wanted = {"seed": 0, "nested": {"difficulty": 2}}
    with caplog.at_level(logging.WARNING, logger="saei.caches"):
        keyed = caches.resolve(path, wanted, "data", _done)
    assert keyed == tmp_path / f"data-{caches.settings_key(wanted)}"
    assert "nested.difficulty: 0 there, 2 here" in caplog.text and "building it" in caplog.text
    _build(keyed, {**wanted, "steps": 5})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saei.caches"):
        assert caches.resolve(path, wanted, "data", _done) == keyed
        assert caches.resolve(path, {"nested": {"difficulty": 2}}, "data", _done) == keyed  # any seed will do
    assert "reusing it" in caplog.text
    assert caches.read_stamp(path) == {"seed": 0, "nested": {"difficulty": 0}}  # the first cache is untouched


def test_a_keyed_folder_that_lies_about_its_settings_is_refused(tmp_path):
    path = tmp_path / "data"
    _build(path, {"seed": 0})
    _build(tmp_path / f"data-{caches.settings_key({'seed': 1})}", {"seed": 7})
    with pytest.raises(ValueError, match="seed differ"):
        caches.resolve(path, {"seed": 1}, "data", _done)


def test_a_folder_without_a_record_is_reused_with_a_warning(tmp_path, caplog):
    path = tmp_path / "data"
    path.mkdir()
    (path / "done").write_text("x")
    with caplog.at_level(logging.WARNING, logger="saei.caches"):
        assert caches.resolve(path, {"seed": 1}, "data", _done) == path
    assert "does not record the settings" in caplog.text


def test_differences_name_nested_and_listed_keys():
    built = {"a": {"b": 1}, "files": [{"seed": 0}], "x": 5}
    assert caches.differences(built, {"a": {"b": 2}, "files": [{"seed": 3}]}) == {"a.b": (1, 2),
                                                                                 "files.0.seed": (0, 3)}
    assert caches.differences(built, {"a": {"b": 1}}) == {}


def test_a_uri_output_dir_keeps_the_drivers_builds_in_the_node_cache(tmp_path, monkeypatch):
    from core.config import load_config

    monkeypatch.setenv("SAEI_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(None, ["run.output_dir=s3://bucket/runs", "data.test_files=[s3://bucket/mine/test.parquet]"])
    assert cfg.model.path == "s3://bucket/runs/tiny_policy/bootstrap"  # what the interpolation makes
    caches.localize_build_paths(cfg)
    build = tmp_path / "cache" / "build"
    assert cfg.model.path == str(build / "tiny_policy" / "bootstrap")
    assert cfg.data.train_files == [str(build / "data" / "synthetic" / "train.parquet")]
    assert cfg.data.test_files == ["s3://bucket/mine/test.parquet"]  # the user's own file stays where it is


def test_a_local_output_dir_keeps_its_builds_in_place():
    from core.config import load_config

    cfg = load_config(None, ["run.output_dir=somewhere"])
    before = (cfg.model.path, list(cfg.data.train_files))
    caches.localize_build_paths(cfg)
    assert (cfg.model.path, cfg.data.train_files) == before
    assert caches.build_root(cfg) == Path("somewhere")
