"""RolloutPool on a real local Ray cluster: counts, order, weights, and an actor killed mid-call."""

import logging
import time

import numpy as np
import pytest
import torch

from actors.pool import RolloutPool
from actors.rollout import Rollout, RolloutRequest
from core import synthetic
from core.batch import Prompt
from core.config import load_config
from core.policy import load_policy
from core.weights import fingerprint


def _prompts(k: int) -> list[Prompt]:
    out = []
    for i in range(k):
        ex = synthetic.make_example(i, split="test")
        out.append(Prompt(uid=f"test:{i}", problem=ex.problem, answer=ex.answer, image=np.asarray(ex.image)))
    return out


def _cfg(workers: int = 2, *extra: str):
    return load_config(None, [f"cluster.rollout_workers={workers}", "cluster.rollout_cpus=1",
                              "rollout.sampling.max_new_tokens=6", "cluster.max_restarts=2", *extra])


def _ids(samples_per_request) -> list[list[list[int]]]:
    return [[s.response_ids.tolist() for s in samples] for samples in samples_per_request]


def _perturbed_weights(path: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in load_policy(path).state_dict().items()}


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_policy_dir):
    p = RolloutPool(str(tiny_policy_dir), _cfg())
    yield p
    p.shutdown()


def test_two_actors_return_exact_counts_in_order_equal_to_one_rollout(pool, tiny_policy_dir):
    counts = [1, 3, 2, 4, 1, 2]
    requests = [RolloutRequest(prompt=p, n=n, seed=100 + i) for i, (p, n) in enumerate(zip(_prompts(6), counts))]
    out, stats = pool.generate(requests, chunk=2)
    assert [len(o) for o in out] == counts
    for req, samples in zip(requests, out):
        assert [s.prompt_uid for s in samples] == [req.prompt.uid] * req.n
        assert [s.index for s in samples] == list(range(req.n))
        assert all(0 < s.response_ids.numel() <= 6 and 0.0 <= s.reward <= 1.0 for s in samples)
    assert stats.samples == sum(counts)
    assert stats.generated_tokens == sum(s.response_ids.numel() for o in out for s in o)
    assert stats.tokens_per_s > 0 and stats.prompt_tokens > 0
    local = Rollout(str(tiny_policy_dir), _cfg(), device="cpu")
    want, _ = local.generate(requests, _cfg().rollout.sampling)
    assert _ids(out) == _ids(want)  # per-request seeds: the split over actors changes nothing


def test_killed_actor_mid_call_loses_and_duplicates_nothing(pool, ray_cluster):
    ray = ray_cluster
    requests = [RolloutRequest(prompt=p, n=2, seed=7 * i) for i, p in enumerate(_prompts(8))]
    want, _ = pool.generate(requests)
    tickets = pool.submit(requests, chunk=1)
    got: dict[int, list] = {}
    for ticket, samples in pool.poll(timeout=None):
        got.setdefault(ticket, []).append(samples)
    ray.kill(pool.actors[0], no_restart=False)  # Ray restarts it; its tasks in flight are lost
    while pool.pending:
        for ticket, samples in pool.poll(timeout=None):
            got.setdefault(ticket, []).append(samples)
    assert sorted(got) == tickets and all(len(v) == 1 for v in got.values())  # each exactly once
    assert _ids([got[t][0] for t in tickets]) == _ids(want)
    assert pool.take_stats().resent >= 1  # the lost tasks went out again


def test_new_weights_reach_every_actor_and_a_restarted_one(pool, ray_cluster, tiny_policy_dir, tmp_path):
    ray = ray_cluster
    requests = [RolloutRequest(prompt=p, n=2, seed=i) for i, p in enumerate(_prompts(4))]
    greedy = _cfg().rollout.sampling
    greedy.temperature = 0.0
    before, _ = pool.generate(requests, greedy, chunk=1)

    weights = _perturbed_weights(str(tiny_policy_dir))
    pool.load_weights(weights)
    after, _ = pool.generate(requests, greedy, chunk=1)
    assert _ids(after) != _ids(before)

    model = load_policy(tiny_policy_dir)
    model.load_state_dict(weights)
    model.save_pretrained(tmp_path)
    for f in tiny_policy_dir.iterdir():  # tokenizer and processor files
        if not f.name.endswith((".safetensors", "config.json")) or f.name == "preprocessor_config.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    fresh = Rollout(str(tmp_path), _cfg(), device="cpu")
    want, _ = fresh.generate(requests, greedy)
    assert _ids(after) == _ids(want)

    pool.expect(pool.version, fingerprint(weights))  # what the learner would report for this version
    ray.kill(pool.actors[1], no_restart=False)  # comes back with the folder's weights ...
    again, stats = pool.generate(requests, greedy, chunk=1)
    assert _ids(again) == _ids(want)  # ... and gets the current ones before it serves
    assert stats.weights_checked == 4  # every task's weights matched the version's fingerprint

    pool.expect(pool.version, fingerprint(load_policy(tiny_policy_dir).state_dict()))  # the learner sent others
    with pytest.raises(RuntimeError, match=r"served weights version \d+ with fingerprint \w+, the learner sent"):
        pool.generate(requests, greedy, chunk=1)
    assert pool.abort() >= 3  # the call's other tasks (one raised) are dropped, not left in the pool
    assert pool.pending == 0 and pool.poll(timeout=0) == []
    pool.expect(pool.version, fingerprint(weights))  # the truth again: later answers are checked against it
    again, stats = pool.generate(requests, greedy, chunk=1)
    assert _ids(again) == _ids(want) and stats.weights_checked == 4


def test_resize_adds_actors_with_current_weights(pool):
    requests = [RolloutRequest(prompt=p, n=1, seed=i) for i, p in enumerate(_prompts(3))]
    want, _ = pool.generate(requests, chunk=1)
    pool.resize(1)
    assert pool.size == 1
    one, _ = pool.generate(requests, chunk=1)
    pool.resize(2)
    two, _ = pool.generate(requests, chunk=1)
    assert _ids(one) == _ids(want) == _ids(two)


def test_a_resize_without_room_times_out_and_the_pool_goes_on(pool, ray_cluster, caplog):
    ray = ray_cluster
    requests = [RolloutRequest(prompt=p, n=1, seed=50 + i) for i, p in enumerate(_prompts(3))]
    want, _ = pool.generate(requests, chunk=1)
    assert ray.available_resources().get("CPU", 0.0) < 1  # the pool's two actors hold the cluster's 2 CPUs
    timeout = pool.cfg.cluster.placement_timeout_s
    pool.cfg.cluster.placement_timeout_s = 3.0
    try:
        with caplog.at_level(logging.INFO, logger="actors.pool"):
            assert pool.resize(3) == 2  # the third actor never finds room
    finally:
        pool.cfg.cluster.placement_timeout_s = timeout
    assert pool.size == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "actors.pool"]
    waiting = [m for m in lines if "waiting for 1 of 1 new rollout actor(s) (CPU=1, GPU=0 each)" in m]
    assert len(waiting) >= 2  # progress while it waits, not silence
    errors = [r.getMessage() for r in caplog.records if r.name == "actors.pool" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "1 new rollout actor(s) not up after 3 s (cluster.placement_timeout_s)" in errors[0]
    assert "each needs CPU=1, GPU=0 on one node" in errors[0] and "goes on with 2 actor(s)" in errors[0]
    unplaced = f"rollout-{pool.tag}-{pool.created}"
    deadline = time.monotonic() + 60
    while unplaced in ray.util.list_named_actors() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert unplaced not in ray.util.list_named_actors()  # killed: it cannot take the room later
    got, _ = pool.generate(requests, chunk=1)
    assert _ids(got) == _ids(want)  # the pool it has still serves


def test_abort_drops_queued_and_inflight_requests_and_the_pool_serves_on(pool):
    requests = [RolloutRequest(prompt=p, n=2, seed=70 + i) for i, p in enumerate(_prompts(6))]
    want, _ = pool.generate(requests, chunk=1)
    tickets = pool.submit(requests, chunk=1)  # 4 in flight (2 per actor), 2 queued
    assert len(pool.inflight) == 4 and len(pool.queue) == 2
    assert pool.abort() == 6 and pool.pending == 0
    assert pool.poll(timeout=0) == []  # nothing of the dropped call comes back ...
    got, _ = pool.generate(requests, chunk=1)
    assert _ids(got) == _ids(want)  # ... and the next call gets exactly its own samples
    assert pool.pending == 0 and max(tickets) < pool.next_ticket - len(requests)  # no ticket is reused


def test_queued_merge_requests_go_out_as_one_batch_with_the_same_samples(pool):
    requests = [RolloutRequest(prompt=p, n=2, seed=31 + i) for i, p in enumerate(_prompts(8))]
    want, _ = pool.generate(requests, chunk=1)
    pool.take_stats()
    # 2 actors x 2 tasks in flight take the first 4; the other 4 wait and leave together
    tickets = [pool.submit([r], chunk=1, merge=True)[0] for r in requests]
    got: dict[int, list] = {}
    while pool.pending:
        for ticket, samples in pool.poll(timeout=None):
            got[ticket] = samples
    stats = pool.take_stats()
    assert sorted(got) == tickets
    assert _ids([got[t] for t in tickets]) == _ids(want)  # batching changes no sample
    assert stats.samples == 16 and len(stats.engine_seconds) == 5  # 4 single calls + 1 merged call
