"""Checkpoints straight to S3 (the moto server of conftest.py): two gloo ranks under FSDP2, each in its own
process with its own node-local cache, write what they own to the bucket and load it back. The loaded
weights equal the saved ones bit for bit, and the step after the load equals the step after the save
(optimizer moments, scheduler and RNG came back too)."""

from __future__ import annotations

import multiprocessing as mp
import uuid
from pathlib import Path

import pytest
import torch

from core.devices import free_port
from core.policy import load_policy
from core.storage import Storage, StorageError
from learner.checkpoint import check_storage_visible


def _rank(rank: int, port: int, policy: str, uri: str, out: str, token: str) -> None:
    """One learner rank: update, save to `uri`, update; a fresh worker loads `uri` and repeats the update."""
    import os

    os.environ["SAEI_CACHE_DIR"] = str(Path(out) / f"cache{rank}")  # a node-local cache per rank: no shared disk
    torch.set_num_threads(1)
    from test_learner_worker import _batch

    from core.config import load_config
    from learner.worker import LearnerWorker

    cfg = load_config(None, ["learner.lr=1e-3", "learner.micro_batch_size=2", "learner.num_workers=2",
                             "cluster.learner_threads=1", "learner.warmup_steps=3", "learner.loss_mode=clip_cov",
                             "learner.clip_cov_frac=0.2", "learner.clip_cov_bounds=[-100,100]"])
    check_storage_visible(uri, token)
    a = LearnerWorker(policy, cfg, rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port, device="cpu")
    a.update(_batch(seed=1))
    saved = a.export_weights()
    a.save(uri, {"cursor": {"epoch": 0, "pos": 4}})
    after_save = a.update(_batch(seed=2))
    want = a.export_weights()
    b = LearnerWorker(policy, cfg, rank=rank, world_size=2, device="cpu")  # the same process group
    client = b.load(uri)
    loaded = b.export_weights()
    after_load = b.update(_batch(seed=2))
    got = b.export_weights()
    staging = sorted(p.name for p in (Path(out) / f"cache{rank}" / "staging").iterdir())
    torch.save({"saved": saved, "loaded": loaded, "want": want, "got": got, "client": client, "step": b.step,
                "lr": (after_save["actor/lr"], after_load["actor/lr"]), "staging": staging},
               Path(out) / f"rank{rank}.pt")
    b.close()


def test_two_ranks_save_to_s3_and_load_back_bitwise(s3_env, tiny_policy_dir, tmp_path):
    ckpt = Storage(f"s3://saei-test/ckpt-{uuid.uuid4().hex[:8]}/checkpoints/step_000001")
    token = ckpt.write_marker()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tiny_policy_dir), ckpt.uri, str(tmp_path), token))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))

    files = ckpt.list_files()
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {f.removeprefix("dcp/") for f in files if f.startswith("dcp/")}
    assert {"rng/rank0.pt", "rng/rank1.pt", "trainer_state.json", "hf/config.json"} <= set(files)
    assert r0["saved"] and r1["saved"] == {}  # the full weights are on rank 0
    assert set(r0["loaded"]) == set(r0["saved"])
    assert all(torch.equal(r0["loaded"][k], r0["saved"][k]) for k in r0["saved"])
    assert all(torch.equal(r0["got"][k], r0["want"][k]) for k in r0["want"])  # the next step too
    assert any(not torch.equal(r0["want"][k], r0["saved"][k]) for k in r0["saved"])  # and it moved the weights
    assert r0["client"] == r1["client"] == {"cursor": {"epoch": 0, "pos": 4}}
    assert r0["step"] == r1["step"] == 2 and r0["lr"][0] == r0["lr"][1]
    assert r0["staging"] == r1["staging"] == []  # staging folders are removed after each save and load
    # the Hugging Face folder in the bucket holds the weights that were saved
    hf = ckpt.join("hf")
    local = hf.download(tmp_path / "hf")
    tensors = load_policy(local).state_dict()
    assert all(torch.equal(tensors[k], v) for k, v in r0["saved"].items())
    assert {p.name for p in Path(tiny_policy_dir).iterdir() if p.name.startswith("tokenizer")} <= {
        p.name for p in local.iterdir()}  # the tokenizer came from the rank's policy folder


def test_a_rank_that_reads_another_marker_is_refused_naming_the_storage(s3_env):
    run = Storage(f"s3://saei-test/marker-{uuid.uuid4().hex[:8]}")
    token = run.write_marker()
    check_storage_visible(run.uri, token)
    with pytest.raises(StorageError, match="not shared with this node") as err:
        check_storage_visible(run.uri, token + "-other")
    assert run.uri in str(err.value)
    with pytest.raises(StorageError, match="no marker"):
        check_storage_visible(run.join("elsewhere").uri, token)
