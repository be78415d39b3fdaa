"""Data files behind a storage URI: read from the S3 server through the node cache, equal to the local read."""

from __future__ import annotations

import uuid

from core import synthetic
from core.data import expand_paths, load_prompts
from core.storage import Storage

BUCKET = "saei-test"  # the bucket the s3_server fixture makes (tests/integration/conftest.py)
OPTS = {"min_pixels": 3136, "max_pixels": 12544}


def _summary(prompts):
    return [(p.uid, p.problem, p.answer, p.image.tobytes()) for p in prompts]


def test_parquet_files_by_uri_folder_and_glob_read_as_the_local_ones(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SAEI_CACHE_DIR", str(tmp_path / "cache"))
    local = tmp_path / "data"
    synthetic.write_dataset(local, n_train=6, n_test=3, seed=0, image_size=56)
    uri = f"s3://{BUCKET}/data-{uuid.uuid4().hex[:8]}"
    Storage(uri).upload(local)

    want, _ = load_prompts([str(local / "train.parquet")], **OPTS)
    for named in (f"{uri}/train.parquet", f"{uri}/train*.parquet"):
        got, report = load_prompts([named], **OPTS)
        assert _summary(got) == _summary(want) and not report.skipped, named
    assert [f.rsplit("/", 1)[1] for f in expand_paths(uri)] == ["test.parquet", "train.parquet"]  # a folder
    copies = expand_paths(f"{uri}/train.parquet")
    assert copies[0].startswith(str(tmp_path / "cache" / "data"))


def test_a_uri_with_no_data_names_it(s3_env, tmp_path, monkeypatch):
    import pytest

    monkeypatch.setenv("SAEI_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{BUCKET}/nothing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(FileNotFoundError, match=uri):
        expand_paths([f"{uri}/train.parquet"])
