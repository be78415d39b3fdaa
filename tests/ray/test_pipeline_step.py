"""One SaEI step through the real pieces (rollout actor, adversary actor, in-process learner), with the
adversary killed during the step: Ray restarts it, the step completes, nothing is lost and the
restarted adversary attacks with the current weights."""

import math
import threading
import time

import numpy as np

from actors.rollout import RolloutPool
from adversary.actor import create_adversary_actor
from cluster.pipeline import Parts, saei_step
from core import synthetic
from core.batch import Prompt
from core.config import load_config
from learner.group import LearnerGroup


def _prompts(n: int) -> list[Prompt]:
    out = []
    for i in range(n):
        ex = synthetic.make_example(100 + i, split="train")
        out.append(Prompt(uid=f"train:{i}", problem=ex.problem, answer=ex.answer, image=np.asarray(ex.image)))
    return out


def test_step_survives_an_adversary_restart(ray_cluster, tiny_policy_dir):
    ray = ray_cluster
    cfg = load_config(None, ["rollout.n_clean=2", "rollout.n_adv=2", "rollout.sampling.max_new_tokens=8",
                             "learner.num_workers=0", "learner.micro_batch_size=4", "cluster.rollout_workers=1",
                             "cluster.rollout_cpus=1", "cluster.adversary_cpus=1", "cluster.max_restarts=2"])
    path = str(tiny_policy_dir)
    pool = RolloutPool(path, cfg)
    adversary = create_adversary_actor(path, cfg)
    parts = Parts(cfg=cfg, pool=pool, learner=LearnerGroup(path, cfg), adversary=adversary)
    prompts = _prompts(3)

    first = saei_step(parts, prompts, step=1, progress=0.0)
    assert pool.version == 1 and ray.get(adversary.weights_version.remote()) == 1
    pid = ray.get(adversary.__ray_call__.remote(lambda self: __import__("os").getpid()))

    # kill the adversary once the step is under way: mid-attack or between attacks, Ray restarts it
    # and the retried or next attack brings version 1 with it
    killer = threading.Timer(0.5, lambda: ray.kill(adversary, no_restart=False))
    t0 = time.perf_counter()
    killer.start()
    second = saei_step(parts, prompts, step=2, progress=1.0)
    step_s = time.perf_counter() - t0
    killer.join()
    assert step_s > 0.5, "the step ended before the kill: it did not test a restart inside a step"
    assert ray.get(adversary.__ray_call__.remote(lambda self: __import__("os").getpid())) != pid
    assert pool.version == 2 and ray.get(adversary.weights_version.remote()) == 2
    for m in (first, second):
        for k in ("reward/adversarial", "accuracy/adversarial", "entropy/adversarial", "tsec/before", "tsec/after"):
            assert m[k] is not None and math.isfinite(m[k]), k
    # every prompt came back with n_clean + n_adv samples
    for m in (first, second):
        assert (m["samples/clean"], m["samples/adversarial"]) == (6, 6)
    pool.shutdown()
    ray.kill(adversary)
