"""RolloutPool with vLLM engines (the CPU build) on a real local Ray cluster: order, weights, restarts.

Two actors, each with its own vLLM engine (engine core + worker processes inside the actor); one
pool serves the module. Restarts cost an engine start each (about 30 s on 2 cores).
"""

import time

import numpy as np
import psutil
import pytest
import torch

from actors.pool import RolloutPool, RolloutRequest
from core import synthetic
from core.batch import Prompt
from core.config import load_config
from core.policy import load_policy

pytest.importorskip("vllm")


def _prompts(k: int) -> list[Prompt]:
    out = []
    for i in range(k):
        ex = synthetic.make_example(i, split="test")
        out.append(Prompt(uid=f"test:{i}", problem=ex.problem, answer=ex.answer, image=np.asarray(ex.image)))
    return out


def _cfg(*extra: str):
    return load_config(None, ["rollout.engine=vllm", "rollout.kv_cache_gb=0.25", "cluster.rollout_workers=2",
                              "cluster.rollout_cpus=1", "rollout.sampling.max_new_tokens=8", "cluster.max_restarts=2",
                              *extra])


def _ids(samples_per_request) -> list[list[list[int]]]:
    return [[s.response_ids.tolist() for s in samples] for samples in samples_per_request]


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_policy_dir):
    p = RolloutPool(str(tiny_policy_dir), _cfg())
    yield p
    p.shutdown()


def _actor_pid(ray, actor, wait: float = 300) -> int:
    """The actor's process id, once it serves again (a restarting actor refuses calls)."""
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + wait
    while True:
        try:
            return ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_counts_and_order_do_not_depend_on_the_split_over_actors(pool):
    counts = [1, 3, 2, 4, 1, 2]
    requests = [RolloutRequest(prompt=p, n=n, seed=100 + i) for i, (p, n) in enumerate(zip(_prompts(6), counts))]
    spread, stats = pool.generate(requests, chunk=1)
    assert [len(o) for o in spread] == counts
    for req, samples in zip(requests, spread):
        assert [s.prompt_uid for s in samples] == [req.prompt.uid] * req.n
        assert [s.index for s in samples] == list(range(req.n))
        assert all(0 < s.response_ids.numel() <= 8 and 0.0 <= s.reward <= 1.0 for s in samples)
        assert all(s.logprobs is not None and s.logprobs.shape == s.response_ids.shape for s in samples)
    assert stats.samples == sum(counts) and stats.tokens_per_s > 0
    together, _ = pool.generate(requests, chunk=6)  # one actor, one engine batch
    assert _ids(together) == _ids(spread)


def test_weights_reach_every_actor_and_a_restarted_one(pool, ray_cluster, tiny_policy_dir):
    ray = ray_cluster
    requests = [RolloutRequest(prompt=p, n=2, seed=i) for i, p in enumerate(_prompts(4))]
    before, _ = pool.generate(requests, chunk=1)
    g = torch.Generator().manual_seed(1)
    weights = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in load_policy(tiny_policy_dir).state_dict().items()}
    pool.load_weights(weights)
    after, _ = pool.generate(requests, chunk=1)
    assert _ids(after) != _ids(before)
    assert _ids(pool.generate(requests, chunk=4)[0]) == _ids(after)  # both actors serve the same weights

    pid = _actor_pid(ray, pool.actors[1])
    ray.kill(pool.actors[1], no_restart=False)  # comes back with the folder's weights ...
    assert _ids(pool.generate(requests, chunk=1)[0]) == _ids(after)  # (its tasks went to the other actor)
    assert _actor_pid(ray, pool.actors[1]) != pid
    again, _ = pool.generate(requests, chunk=1)  # both actors serve
    assert _ids(again) == _ids(after)  # ... and loads the current ones before it serves


def test_a_dead_engine_restarts_its_actor_and_loses_nothing(pool, ray_cluster, tiny_policy_dir):
    """vLLM's own process layout (engine core and worker in processes of their own, the GPU default):
    when those processes die, the actor exits, Ray restarts it, and its requests are sent again."""
    ray = ray_cluster
    requests = [RolloutRequest(prompt=p, n=2, seed=7 * i) for i, p in enumerate(_prompts(6))]
    pool.load_weights(load_policy(tiny_policy_dir).state_dict())  # the folder's, as the new pool starts
    want, _ = pool.generate(requests, chunk=1)  # the in-process engines of the module's pool
    pool.shutdown()  # frees the two cores for this test's pool
    mp = RolloutPool(str(tiny_policy_dir), _cfg("rollout.vllm_inprocess=false"), num_actors=1)
    try:
        assert _ids(mp.generate(requests, chunk=1)[0]) == _ids(want)  # the same engine either way
        mp.take_stats()
        pid = _actor_pid(ray, mp.actors[0])
        engine_procs = [c for c in psutil.Process(pid).children(recursive=True) if c.name().startswith("VLLM")]
        assert engine_procs, "the actor's vLLM processes were not found"
        for c in engine_procs:
            c.kill()
        psutil.wait_procs(engine_procs, timeout=30)
        got, stats = mp.generate(requests, chunk=1)
        assert _ids(got) == _ids(want)  # every request once, with the same samples
        assert stats.resent >= 1 and _actor_pid(ray, mp.actors[0]) != pid
    finally:
        mp.shutdown()
