"""core.storage and core.node_cache against a real S3 server (moto_server, a subprocess on 127.0.0.1 with
IAM authentication on), configured only through the standard AWS environment variables, plus two
processes fetching one digest at once. Error paths print their measured seconds."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from core.devices import free_port
from core.node_cache import NodeCache, tree_digest
from core.storage import Storage, StorageError

REPO = Path(__file__).resolve().parents[2]
BUCKET = "saei-test"  # the bucket the s3_server fixture makes (tests/integration/conftest.py)


@pytest.fixture
def run(s3_env):
    s = Storage(f"s3://{BUCKET}/runs/{uuid.uuid4().hex[:8]}")
    yield s
    s.delete()


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


FILES = {"config.json": b'{"a": 1}', "model.safetensors": os.urandom(300_000), "tok/vocab.json": b"{}"}


def test_read_write_list_delete_with_only_environment_variables(run):
    run.check_writable()
    run.write_bytes("ckpt/step_1/rank0.bin", b"\x00" * 1000)
    run.write_text("ckpt/step_1/COMPLETE", "ok")
    run.write_text("config.yaml", "a: 1\n")
    assert run.read_text("config.yaml") == "a: 1\n" and run.read_bytes("ckpt/step_1/rank0.bin") == b"\x00" * 1000
    assert run.list() == ["ckpt", "config.yaml"] and run.list("ckpt/step_1") == ["COMPLETE", "rank0.bin"]
    assert run.list_files() == ["ckpt/step_1/COMPLETE", "ckpt/step_1/rank0.bin", "config.yaml"]
    assert run.exists("ckpt/step_1/COMPLETE") and not run.exists("ckpt/step_2")
    run.write_text("config.yaml", "a: 2\n")
    assert run.read_text("config.yaml") == "a: 2\n"
    with pytest.raises(FileNotFoundError):
        run.read_bytes("nope")
    run.delete("ckpt")
    assert run.list() == ["config.yaml"] and run.list("ckpt") == []


def test_upload_download_and_fetch_through_the_node_cache(run, tmp_path):
    src = _tree(tmp_path / "policy", FILES)
    run.upload(src, "policy")
    assert run.list_files("policy") == sorted(FILES)
    assert tree_digest(run.download(tmp_path / "down", "policy")) == tree_digest(src)
    cache, digest = NodeCache(tmp_path / "cache"), tree_digest(src)
    got = cache.fetch_tree(run.join("policy"), digest, verify=True)
    assert tree_digest(got) == digest
    run.delete("policy")
    assert cache.fetch_tree(run.join("policy"), digest) == got and cache.stats["fills"] == 1


_CHILD = """
import json, pickle, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from core.node_cache import NodeCache
storage, digest, go, mode = pickle.loads(bytes.fromhex(sys.argv[1]))
if mode == "marker":
    storage.check_visible(digest)
    print(json.dumps({{"ok": True}}))
    sys.exit(0)
while not Path(go).exists():
    time.sleep(0.01)
cache = NodeCache({cache!r})
path = cache.fetch_tree(storage, digest, verify=True)
print(json.dumps({{"path": str(path), **cache.stats}}))
"""


def _child(tmp_path: Path, args: tuple) -> subprocess.Popen:
    code = _CHILD.format(repo=str(REPO), cache=str(tmp_path / "cache"))
    return subprocess.Popen([sys.executable, "-c", code, pickle.dumps(args).hex()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_marker_checked_in_another_process_from_its_own_environment(run, tmp_path):
    token = run.write_marker()
    proc = _child(tmp_path, (run, token, "", "marker"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    proc = _child(tmp_path, (run.join("elsewhere"), token, "", "marker"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "not shared with this node" in err


def test_two_processes_fetching_one_digest_download_it_once(run, tmp_path):
    src = _tree(tmp_path / "policy", {f"shard{i}.bin": os.urandom(2_000_000) for i in range(8)})
    run.upload(src, "policy")
    digest, go = tree_digest(src), tmp_path / "go"
    procs = [_child(tmp_path, (run.join("policy"), digest, str(go), "fetch")) for _ in range(2)]
    time.sleep(1.0)  # both interpreters up and polling (a late one would just be a plain hit)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert results[0]["path"] == results[1]["path"] and tree_digest(results[0]["path"]) == digest
    assert sorted(r["fills"] for r in results) == [0, 1] and sum(r["hits"] for r in results) == 1
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


# ---- errors ------------------------------------------------------------------------------------------
def _failure(storage: Storage) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(StorageError) as e:
        storage.check_writable()
    return str(e.value), time.monotonic() - start


def test_unreachable_endpoint_fails_fast_naming_the_variable(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    msg, seconds = _failure(Storage(f"s3://{BUCKET}/run"))
    print(f"\nunreachable endpoint (refused): StorageError after {seconds:.2f} s")
    assert f"s3://{BUCKET}/run" in msg and "AWS_ENDPOINT_URL" in msg and "cannot be reached" in msg
    assert seconds < 60, "bounded retries: a refused connection must not take minutes"


def test_silent_endpoint_fails_after_the_configured_timeouts(s3_env, monkeypatch):
    # A server that accepts and never answers (a wrong service, a stuck proxy): the costly case.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("SAEI_S3_REQUEST_TIMEOUT_S", "2")
        monkeypatch.setenv("SAEI_S3_MAX_ATTEMPTS", "2")
        msg, seconds = _failure(Storage(f"s3://{BUCKET}/run"))
    print(f"\nsilent endpoint, 2 s x 2 attempts: StorageError after {seconds:.2f} s")
    assert "AWS_ENDPOINT_URL" in msg and "cannot be reached" in msg
    assert seconds < 60, "the request timeout must bound a silent server"


@pytest.mark.parametrize("case", ["wrong secret", "unknown key"])
def test_wrong_credentials_name_the_variables(s3_env, monkeypatch, case):
    if case == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    msg, seconds = _failure(Storage(f"s3://{BUCKET}/run"))
    print(f"\n{case}: StorageError after {seconds:.2f} s")
    assert f"s3://{BUCKET}/run" in msg and "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg
    assert "refused" in msg


def test_missing_credentials_name_the_variables(s3_env, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/credentials to fall back on
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    msg, seconds = _failure(Storage(f"s3://{BUCKET}/run"))
    print(f"\nmissing credentials: StorageError after {seconds:.2f} s")
    assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg


def test_missing_bucket_names_the_bucket(s3_env):
    msg, _ = _failure(Storage("s3://no-such-bucket-saei/run"))
    assert "s3://no-such-bucket-saei/run" in msg and "'no-such-bucket-saei' does not exist" in msg
