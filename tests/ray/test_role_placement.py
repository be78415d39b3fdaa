"""Placement of the roles on a local Ray cluster: the custom resources and accelerator types of
`cluster.*` reach Ray, a role whose room has vanished stops the job within `cluster.placement_timeout_s`
with one line naming the resources (at start, and when a dead actor's replacement finds no node), and a
rollout actor SIGKILLed mid-generate inside a step is replaced with the step's groups complete."""

import logging
import os
import threading
import time

import numpy as np
import psutil
import pytest

from actors.pool import RolloutPool
from actors.rollout import RolloutRequest
from adversary.actor import create_adversary_actor
from cluster.pipeline import Parts, saei_step
from core import synthetic
from core.batch import Prompt
from core.config import load_config
from core.resources import PlacementTimeout
from learner.group import LearnerGroup


def _prompts(n: int) -> list[Prompt]:
    out = []
    for i in range(n):
        ex = synthetic.make_example(200 + i, split="train")
        out.append(Prompt(uid=f"train:{i}", problem=ex.problem, answer=ex.answer, image=np.asarray(ex.image)))
    return out


def _cfg(*extra: str):
    return load_config(None, ["rollout.sampling.max_new_tokens=6", "cluster.rollout_cpus=1", "cluster.adversary_cpus=1",
                              "learner.num_workers=0", "learner.micro_batch_size=4", *extra])


def _rollout_actors(ray) -> set[str]:
    return {n for n in ray.util.list_named_actors() if n.startswith("rollout-")}


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


def test_rollout_actors_whose_resource_no_node_has_stop_the_start_naming_it(ray_cluster):
    ray = ray_cluster
    before = _rollout_actors(ray)
    cfg = _cfg("cluster.rollout_workers=1", "cluster.rollout_resources={gone: 1}", "cluster.placement_timeout_s=3")
    t0 = time.monotonic()
    with pytest.raises(PlacementTimeout) as err:
        RolloutPool("unused: never loaded, the actor is never placed", cfg)
    assert time.monotonic() - t0 < 60  # bounded by the timeout, not by Ray
    text = _one_line(err.value)
    assert "1 of 1 rollout actor(s) not up within 3 s (cluster.placement_timeout_s)" in text, text
    assert "each needs CPU=1, GPU=0, gone=1 on one node" in text and "gone=0 free" in text, text
    assert "cluster.rollout_resources" in text, text
    deadline = time.monotonic() + 60
    while _rollout_actors(ray) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _rollout_actors(ray) == before  # the unplaced actor was killed: it cannot take room later


def test_a_replacement_with_no_room_stops_the_wait_naming_the_resources(ray_cluster, tiny_policy_dir, caplog):
    ray = ray_cluster
    cfg = _cfg("cluster.rollout_workers=2", "cluster.max_restarts=0")
    pool = RolloutPool(str(tiny_policy_dir), cfg)
    cfg.cluster.placement_timeout_s = 3.0  # after the start: loading the policy takes longer on 2 shared cores
    try:
        requests = [RolloutRequest(prompt=p, n=1, seed=i) for i, p in enumerate(_prompts(4))]
        pool.generate(requests, chunk=1)
        # the room of the dead actor's kind vanishes with it (as when its node dies and no other node
        # of that kind is left): its replacement asks for a resource no node has
        pool.cfg.cluster.rollout_resources = {"gone": 1.0}
        ray.kill(pool.actors[0])  # no restarts left: the pool replaces it
        t0 = time.monotonic()
        with caplog.at_level(logging.INFO, logger="actors.placement"), pytest.raises(PlacementTimeout) as err:
            pool.generate(requests, chunk=1)
        assert time.monotonic() - t0 < 60
        text = _one_line(err.value)
        assert "1 of 2 rollout actor(s) not up within 3 s" in text and "gone=1" in text, text
        waiting = [r.getMessage() for r in caplog.records if r.name == "actors.placement"]
        assert any("waiting for room for 1 of 2 rollout actor(s) (CPU=1, GPU=0, gone=1 each; Ray reports "
                   "PENDING_CREATION)" in m for m in waiting), waiting
    finally:
        pool.abort()
        pool.shutdown()


def test_an_adversary_with_no_room_stops_the_step_naming_its_resources(ray_cluster, tiny_policy_dir):
    ray = ray_cluster
    cfg = _cfg("cluster.rollout_workers=1", "rollout.n_clean=2", "rollout.n_adv=2",
               "cluster.adversary_resources={gone: 1}", "cluster.adversary_accelerator_type=H100")
    path = str(tiny_policy_dir)
    pool = RolloutPool(path, cfg)
    cfg.cluster.placement_timeout_s = 3.0  # after the pool's start (loading the policy takes longer)
    adversary = create_adversary_actor(path, cfg)
    parts = Parts(cfg=cfg, pool=pool, learner=LearnerGroup(path, cfg), adversary=adversary)
    try:
        t0 = time.monotonic()
        with pytest.raises(PlacementTimeout) as err:  # the first attack would wait for it forever
            saei_step(parts, _prompts(2), step=1, progress=0.0)
        assert time.monotonic() - t0 < 120
        text = _one_line(err.value)
        assert "1 of 1 adversary(s) not up within 3 s" in text, text
        assert "CPU=1, GPU=0, gone=1, accelerator_type:H100=0.001" in text, text
        assert "cluster.adversary_resources" in text and "cluster.adversary_accelerator_type" in text, text
    finally:
        pool.abort()
        pool.shutdown()
        ray.kill(adversary)


def _kill_mid_generate(pid: int, stop: threading.Event, out: dict) -> None:
    """SIGKILL rollout actor process `pid` while its title says it runs `generate` (Ray sets it per task)."""
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            busy = proc.cmdline()[0].startswith("ray::RolloutActor.generate")
        except (psutil.NoSuchProcess, IndexError):
            return
        if busy:
            proc.kill()
            out["killed"] = pid
            return
        time.sleep(0.002)


def test_a_rollout_actor_killed_mid_generate_is_replaced_and_the_step_is_complete(ray_cluster, tiny_policy_dir):
    ray = ray_cluster
    cfg = _cfg("cluster.rollout_workers=2", "rollout.n_clean=3", "rollout.n_adv=0", "rollout.stream_chunk=1",
               "cluster.max_restarts=4")
    path = str(tiny_policy_dir)
    pool = RolloutPool(path, cfg)
    parts = Parts(cfg=cfg, pool=pool, learner=LearnerGroup(path, cfg), adversary=None)
    prompts = _prompts(4)
    pid = ray.get(pool.actors[0].__ray_call__.remote(lambda self: os.getpid()))
    try:
        for step in range(1, 5):  # a kill that misses every generate (too quick) is tried again
            stop, seen = threading.Event(), {}
            killer = threading.Thread(target=_kill_mid_generate, args=(pid, stop, seen))
            killer.start()
            metrics = saei_step(parts, prompts, step=step, progress=0.0)
            stop.set()
            killer.join()
            assert metrics["samples/clean"] == 4 * 3 and metrics["samples/adversarial"] == 0
            assert metrics["samples/lost"] == metrics["samples/duplicated"] == 0
            if seen:
                break
        else:
            pytest.fail("no kill landed inside a generate in 4 steps")
        assert metrics["rollout/resent"] >= 1, metrics  # the killed actor's tasks went out again
        new_pid = ray.get(pool.actors[0].__ray_call__.remote(lambda self: os.getpid()), timeout=120)
        assert new_pid != pid  # Ray restarted it (a new process) and it serves the next step
        again = saei_step(parts, prompts, step=step + 1, progress=1.0)
        assert again["samples/clean"] == 12 and again["samples/lost"] == again["samples/duplicated"] == 0
    finally:
        pool.shutdown()


def test_learner_ranks_whose_resource_no_node_has_stop_naming_it(ray_cluster):
    cfg = _cfg("learner.num_workers=2", "cluster.learner_cpus=0.5", "cluster.learner_resources={gone: 2}",
               "cluster.placement_timeout_s=2")
    with pytest.raises(PlacementTimeout) as err:
        LearnerGroup("unused: the ranks are never placed", cfg)
    text = _one_line(err.value)
    assert "2 of 2 learner rank(s) not up within 2 s" in text and "CPU=0.5, GPU=0, gone=2" in text, text
    # the group's placement group is gone with it: nothing waits to take the room later
    from ray.util import placement_group_table

    deadline = time.monotonic() + 30
    while (pending := [p for p in placement_group_table().values() if p["state"] not in ("REMOVED",)
                       and any("gone" in b for b in p["bundles"].values())]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pending, pending
