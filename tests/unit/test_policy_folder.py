"""core.node_cache.PolicyFolder: how the policy folder reaches a node that does not see the driver's disk.

The object store is stood in for by a plain dict (`put` stores bytes under a key, `get` returns them),
which is all PolicyFolder asks of Ray; the Ray path itself is tests/ray/test_policy_folder.py.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from core.node_cache import NodeCache, PolicyFolder, listing_digest, node_local, policy_folder, tree_digest
from core.storage import Storage

FILES = {"config.json": b'{"model_type": "qwen2_vl"}', "model.safetensors": os.urandom(2048),
         "tokenizer/vocab.json": b'{"a": 0}'}


def _folder(root, files=FILES):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _read(folder) -> dict[str, bytes]:
    return {rel: (folder / rel).read_bytes() for rel in FILES}


class ObjectStore:
    """put/get over a dict; counts the gets (what a node would fetch)."""

    def __init__(self):
        self.objects, self.gets = {}, 0

    def put(self, data: bytes) -> str:
        key = f"ref-{len(self.objects)}"
        self.objects[key] = bytes(data)
        return key

    def get(self, key: str) -> bytes:
        self.gets += 1
        return self.objects[key]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "node_cache"
    monkeypatch.setenv("SAEI_CACHE_DIR", str(root))  # node_local's NodeCache() lands here
    return root


def test_a_small_local_folder_travels_packed_and_survives_the_drivers_folder(tmp_path, cache_dir):
    src = _folder(tmp_path / "policy")
    store = ObjectStore()
    folder = policy_folder(src, put=store.put)
    assert folder.packed is not None and folder.digest == tree_digest(src)
    sent = pickle.loads(pickle.dumps(folder))  # what Ray sends to an actor
    shutil.rmtree(src)  # a node that never saw the driver's disk
    local = sent.local(get=store.get)
    assert local != str(src) and local.startswith(str(cache_dir))
    assert _read(Path(local)) == FILES
    # a second actor on the node reuses the entry: no second fetch from the object store
    assert node_local(sent, get=store.get) == local and store.gets == 1


def test_a_packed_folder_without_get_names_the_fix(tmp_path, cache_dir):
    folder = policy_folder(_folder(tmp_path / "policy"), put=ObjectStore().put)
    with pytest.raises(ValueError, match="get=ray.get"):
        folder.local()


def test_a_folder_over_the_ship_limit_or_without_put_stays_a_path(tmp_path, cache_dir):
    src = _folder(tmp_path / "policy")
    store = ObjectStore()
    big = policy_folder(src, put=store.put, ship_max_bytes=100)
    assert big == PolicyFolder(str(src)) and not store.objects
    assert policy_folder(src) == PolicyFolder(str(src))
    assert big.local() == str(src)  # every node must see it there: here it does


def test_a_path_this_node_does_not_see_names_the_path_the_node_and_the_fix(tmp_path, cache_dir):
    missing = tmp_path / "only_on_the_driver"
    with pytest.raises(FileNotFoundError) as err:
        node_local(str(missing), where="10.0.0.2")
    msg = str(err.value)
    assert str(missing) in msg and "10.0.0.2" in msg and "s3://" in msg and "every node" in msg


def test_a_uri_is_fetched_once_into_the_node_cache(tmp_path, cache_dir):
    remote = _folder(tmp_path / "bucket" / "policy")
    uri = f"file://{remote}"
    folder = policy_folder(uri)
    assert folder.packed is None and folder.digest == listing_digest(Storage(uri))
    cache = NodeCache(cache_dir)
    local = folder.local(cache=cache)
    assert local.startswith(str(cache_dir)) and _read(Path(local)) == FILES
    assert folder.local(cache=cache) == local and cache.stats["fills"] == 1
    # without a digest (check_inputs on the driver, before Ray) the listing is read where it runs
    assert PolicyFolder(uri).local(cache=cache) == local


def test_a_uri_whose_files_changed_gets_a_new_digest(tmp_path):
    remote = _folder(tmp_path / "policy")
    before = listing_digest(Storage(f"file://{remote}"))
    (remote / "model.safetensors").write_bytes(os.urandom(4096))
    assert listing_digest(Storage(f"file://{remote}")) != before


def test_a_uri_with_no_model_in_it_is_refused_naming_the_uri(tmp_path, cache_dir):
    empty = tmp_path / "bucket" / "nothing_here"
    empty.mkdir(parents=True)
    (empty / "README").write_text("not a model")
    uri = f"file://{empty}"
    with pytest.raises(FileNotFoundError, match="no config.json") as err:
        policy_folder(uri)
    assert str(empty) in str(err.value)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        node_local(uri)


@pytest.mark.parametrize("override, key", [("model.ship_max_gb=-1", "model.ship_max_gb"),
                                           ("model.path=s3://", "model.path")])
def test_config_refuses_a_bad_ship_limit_or_a_uri_without_a_folder(override, key):
    from core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[override])
    assert load_config(overrides=["model.path=s3://bucket/policies/qwen"]).model.path == "s3://bucket/policies/qwen"


def test_ensure_policy_takes_a_uri_as_it_is_and_refuses_one_without_a_model(tmp_path):
    from cluster.bootstrap import ensure_policy
    from core.config import load_config

    (tmp_path / "empty").mkdir()
    remote = _folder(tmp_path / "bucket" / "policy")
    out = f"run.output_dir={tmp_path / 'runs'}"
    cfg = load_config(overrides=[f"model.path=file://{tmp_path / 'empty'}", out])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ensure_policy(cfg)  # model.build_tiny is true: a URI is still never built into
    assert not (tmp_path / "runs").exists()
    cfg = load_config(overrides=[f"model.path=file://{remote}", out])
    assert ensure_policy(cfg) == f"file://{remote}"
