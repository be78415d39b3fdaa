"""LearnerGroup as it runs for real: ranks in Ray actors, FSDP2 over a gloo group on loopback."""

import os
import signal
import time

import numpy as np
import pytest
import torch

from core.batch import TrainBatch
from core.config import load_config
from learner.group import LearnerGroup, LearnerRankDied, _all_ranks
from learner.worker import GROUP_TIMEOUT


def _batch(seed: int, n: int = 7) -> TrainBatch:
    rng = np.random.default_rng(seed)
    return TrainBatch(
        problems=["<image>How many shapes are red?", "What is the angle x?<image>", "Add the numbers."],
        images=[rng.integers(0, 256, (56, 84, 3), dtype=np.uint8) for _ in range(3)],
        responses=[torch.from_numpy(rng.integers(20, 300, int(rng.integers(2, 9)))) for _ in range(n)],
        context=torch.from_numpy(rng.integers(0, 3, n)),
        advantages=torch.from_numpy(rng.normal(size=n).astype(np.float32)),
    )


def _cfg(workers: int):
    return load_config(None, [f"learner.num_workers={workers}", "learner.lr=1e-3", "learner.micro_batch_size=2",
                              "cluster.learner_cpus=1"])


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_ranks_equal_one_and_remote_equals_local_and_resume_is_exact(ray_cluster, tiny_policy_dir, tmp_path):
    ray = ray_cluster
    b1, b2 = _batch(1), _batch(2)
    path = str(tiny_policy_dir)

    local = LearnerGroup(path, _cfg(0))
    m_local = local.update(b1)
    w_local = local.export_weights()

    one = LearnerGroup(path, _cfg(1))  # one rank in a Ray actor: the same arithmetic as in-process
    m_one = one.update(b1)
    w_one = one.export_weights()
    one.shutdown()
    assert _max_diff(w_one, w_local) == 0.0
    assert m_one["actor/loss"] == m_local["actor/loss"]

    two = LearnerGroup(path, _cfg(2))
    assert two.num_workers == 2
    m_two = two.update(b1)
    w_two = two.export_weights()
    # Two ranks reduce the gradient in another order; Adam's first step (lr * g / (|g| + eps))
    # turns float noise in near-zero gradients into at most a fraction of lr.
    assert _max_diff(w_two, w_local) < 0.05 * 1e-3
    assert abs(m_two["actor/grad_norm"] - m_local["actor/grad_norm"]) < 1e-5 * m_local["actor/grad_norm"]
    assert abs(m_two["actor/loss"] - m_local["actor/loss"]) < 1e-6
    assert m_two["learner/tokens"] == m_local["learner/tokens"] == b1.num_tokens
    assert _max_diff(ray.get(two.export_weights_ref()), w_two) == 0.0

    two.save(str(tmp_path / "ckpt"), {"data_cursor": 3})
    two.update(b2)
    w_continued = two.export_weights()
    two.shutdown()

    resumed = LearnerGroup(path, _cfg(2))
    assert resumed.load(str(tmp_path / "ckpt")) == {"data_cursor": 3}
    resumed.update(b2)
    assert _max_diff(resumed.export_weights(), w_continued) == 0.0
    resumed.shutdown()


def _kill_rank(ray, group: LearnerGroup, rank: int) -> None:
    os.kill(ray.get(group.actors[rank].pid.remote()), signal.SIGKILL)


# rank 0 owns the reference export_weights_ref returns; rank 1 only takes part in the gather
@pytest.mark.parametrize("call,dead", [("export_weights", 0), ("load", 1)])
def test_a_rank_that_dies_is_named_before_the_group_timeout(ray_cluster, tiny_policy_dir, tmp_path, call, dead):
    ray = ray_cluster
    group = LearnerGroup(str(tiny_policy_dir), _cfg(2))
    try:
        if call == "load":
            group.save(str(tmp_path / "ckpt"))
        _kill_rank(ray, group, dead)
        t0 = time.monotonic()
        with pytest.raises(LearnerRankDied) as info:
            if call == "load":
                group.load(str(tmp_path / "ckpt"))
            else:
                group.export_weights_ref()
        waited = time.monotonic() - t0
    finally:
        group.shutdown()
    assert (info.value.rank, info.value.call) == (dead, call)
    assert str(info.value).startswith(f"learner rank {dead} on node {group.nodes[dead]} died during {call} (")
    assert group.nodes[dead] == "127.0.0.1"  # the node's address, from Ray
    # the survivor would otherwise wait for the dead rank in a collective until the group's timeout
    assert waited < GROUP_TIMEOUT.total_seconds()


def test_the_dead_rank_is_named_even_when_a_survivor_reports_first(ray_cluster):
    ray = ray_cluster

    class Rank:  # defined here so that Ray ships it by value (workers cannot import a test module)
        """A stand-in rank: raises what a survivor's gloo raises, or dies after `die_after` seconds."""

        def up(self) -> bool:
            return True

        def run(self, die_after: float | None) -> None:
            if die_after is None:
                raise RuntimeError("Connection closed by peer")
            time.sleep(die_after)
            os._exit(1)

    rank = ray.remote(num_cpus=0)(Rank)
    dying, survivor = rank.remote(), rank.remote()
    ray.get([dying.up.remote(), survivor.up.remote()])
    with pytest.raises(LearnerRankDied) as info:  # the survivor's error arrives first
        _all_ranks([dying.run.remote(0.5), survivor.run.remote(None)], "update")
    assert (info.value.rank, info.value.call) == (0, "update")
    # no rank died: the rank's own error comes through
    with pytest.raises(ray.exceptions.RayTaskError, match="Connection closed by peer"):
        _all_ranks([survivor.run.remote(None), rank.remote().run.remote(None)], "update")
