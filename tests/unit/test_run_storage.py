"""Where a run lives in storage: `run.resume_from` resolved by reading storage (a local path, file:// and
an in-process fsspec memory:// store standing in for a bucket), unique run folders, and the driver's
files uploaded when they change (cluster.run_folder)."""

from __future__ import annotations

import json
import os
import uuid

import pytest

import cluster.checkpoints as ckpts
from cluster.checkpoints import (
    checkpoint_path,
    checkpoint_step,
    is_complete,
    parent,
    resolve_checkpoint,
    resume_line,
    run_dir_for,
)
from cluster.run_folder import RunFolder
from core.config import load_config
from core.storage import Storage


def _cfg(output_dir: str, *extra: str):
    return load_config(None, [f"run.output_dir={output_dir}", "run.name=exp", *extra])


def _checkpoint(run: Storage, step: int, complete: bool = True) -> Storage:
    ckpt = checkpoint_path(run, step)
    ckpt.write_bytes("dcp/__0_0.distcp", b"shard")
    if complete:
        ckpt.write_text("trainer_state.json", json.dumps({"step": step, "client_state": {"step": step}}))
    return ckpt


@pytest.fixture(params=["path", "file", "memory"])
def out(request, tmp_path):
    """The same output folder given as a local path, a file:// URI, or an object store (memory://)."""
    if request.param == "memory":
        uri = f"memory://bucket/{uuid.uuid4().hex[:8]}/runs"
        yield uri
        Storage(uri).delete()
    else:
        yield str(tmp_path / "runs") if request.param == "path" else f"file://{tmp_path}/runs"


def test_latest_is_the_newest_complete_checkpoint_of_the_newest_run_by_name(out):
    root = Storage(out)
    old, new, newer = (root.join(f"exp-{t}") for t in ("20250101-120000", "20250102-120000", "20250102-120000-2"))
    _checkpoint(old, 8)
    _checkpoint(new, 2)
    _checkpoint(new, 4)
    _checkpoint(new, 6, complete=False)  # a kill cut it short: never picked
    _checkpoint(newer, 2, complete=False)  # the newest run has no complete checkpoint: passed by
    _checkpoint(root.join("other-20990101-000000"), 10)  # another run name
    _checkpoint(root.join("exp-notes"), 12)  # not a run folder of this name
    found = resolve_checkpoint(_cfg(out, "run.resume_from=latest"))
    assert found == checkpoint_path(new, 4)
    assert checkpoint_step(found) == 4
    assert is_complete(found) and not is_complete(checkpoint_path(new, 6))


def test_a_run_folder_or_a_checkpoint_folder_resolves_and_an_incomplete_one_is_refused(out):
    run = Storage(out).join("exp-20250101-120000")
    _checkpoint(run, 2)
    last = _checkpoint(run, 4)
    _checkpoint(run, 6, complete=False)
    assert resolve_checkpoint(_cfg(out, f"run.resume_from={run.uri}")) == last
    assert resolve_checkpoint(_cfg(out, f"run.resume_from={last.uri}")) == last
    cut = checkpoint_path(run, 6)
    with pytest.raises(FileNotFoundError, match="trainer_state.json") as err:
        resolve_checkpoint(_cfg(out, f"run.resume_from={cut.uri}"))
    assert cut.uri in str(err.value)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint") as err:
        resolve_checkpoint(_cfg(Storage(out).join("empty").uri, "run.resume_from=latest"))
    assert Storage(out).join("empty").uri in str(err.value)


def test_a_checkpoint_without_a_step_names_the_file_in_storage(out):
    ckpt = checkpoint_path(Storage(out).join("exp-20250101-120000"), 2)
    ckpt.write_text("trainer_state.json", json.dumps({"step": 2, "client_state": None}))
    with pytest.raises(ValueError, match="client_state.step") as err:
        checkpoint_step(ckpt)
    assert ckpt.join("trainer_state.json").uri in str(err.value)
    ckpt.write_text("trainer_state.json", "{not json")
    with pytest.raises(ValueError, match="not JSON"):
        checkpoint_step(ckpt)


def test_run_folders_are_unique_by_what_storage_holds(out, monkeypatch):
    monkeypatch.setattr(ckpts.time, "strftime", lambda fmt: "20250101-120000")
    cfg = _cfg(out)
    first = run_dir_for(cfg)
    assert first == Storage(out).join("exp-20250101-120000")
    first.write_text("config.yaml", "a: 1\n")  # an object store has a folder once a file is in it
    second = run_dir_for(cfg)
    assert second == Storage(out).join("exp-20250101-120000-2")
    second.write_text("config.yaml", "a: 1\n")
    assert run_dir_for(cfg) == Storage(out).join("exp-20250101-120000-3")
    assert parent(parent(checkpoint_path(second, 3))) == second


def test_resume_line_names_the_uri():
    line = resume_line("s3://bucket/runs/exp-1/checkpoints/step_000002", ["python", "-m", "cluster.train"])
    assert "run.resume_from=s3://bucket/runs/exp-1/checkpoints/step_000002" in line
    assert resume_line(Storage("memory://b/x")) == resume_line("memory://b/x")


@pytest.fixture
def remote(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEI_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"memory://bucket/{uuid.uuid4().hex[:8]}/exp-20250101-120000"
    yield Storage(uri)
    Storage(uri).delete()


def test_sync_uploads_only_changed_files_and_waits_between_syncs(remote, tmp_path):
    run = RunFolder(remote, sync_every_s=3600)
    assert run.local.is_relative_to(tmp_path / "cache" / "runs")
    (run.local / "config.yaml").write_text("a: 1\n")
    (run.local / "tensorboard").mkdir()
    (run.local / "tensorboard" / "events").write_bytes(b"e1")
    assert run.sync(force=True) == ["config.yaml", "tensorboard/events"]
    assert remote.read_text("config.yaml") == "a: 1\n"
    assert run.sync(force=True) == []  # nothing changed
    with open(run.local / "metrics.jsonl", "a") as f:
        f.write('{"step": 1}\n')
    assert run.sync() == []  # not forced: sync_every_s has not passed
    assert not remote.exists("metrics.jsonl")
    run.sync_every_s = 0
    assert run.sync() == ["metrics.jsonl"]
    with open(run.local / "metrics.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    assert run.sync() == ["metrics.jsonl"]
    assert remote.read_text("metrics.jsonl") == '{"step": 1}\n{"step": 2}\n'


def test_a_resumed_remote_run_gets_its_files_back_but_not_its_checkpoints(remote):
    remote.write_text("metrics.jsonl", '{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    remote.write_bytes("tensorboard/events", b"ev")
    remote.write_text(".saei_storage_marker", "token")
    _checkpoint(remote, 2)
    stale = RunFolder(remote)
    (stale.local / "leftover.txt").write_text("from an earlier process on this node")
    run = RunFolder(remote, sync_every_s=0, resume=True)
    assert run.local == stale.local
    assert sorted(p.relative_to(run.local).as_posix() for p in run.local.rglob("*") if p.is_file()) == [
        "metrics.jsonl", "tensorboard/events"]
    assert run.sync(force=True) == []  # what came down is what storage holds
    (run.local / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')  # MetricsSink truncates a resume
    assert run.sync() == ["metrics.jsonl"]
    assert remote.read_text("metrics.jsonl") == '{"step": 1}\n{"step": 2}\n'


def test_a_local_run_folder_is_its_own_local_copy(tmp_path):
    run = RunFolder(Storage(str(tmp_path / "runs" / "exp-1")), sync_every_s=0)
    assert run.local == tmp_path / "runs" / "exp-1" and run.local.is_dir()
    (run.local / "metrics.jsonl").write_text("{}\n")
    assert run.sync(force=True) == []
    assert os.listdir(tmp_path / "runs" / "exp-1") == ["metrics.jsonl"]
