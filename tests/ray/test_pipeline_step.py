"""One SaEI step through the real pieces (rollout actor, adversary actor, in-process learner), with the
adversary killed during the step: Ray restarts it, the step completes, nothing is lost and the
restarted adversary attacks with the current weights."""

import math
import threading
import time

import numpy as np
import pytest
import torch

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
    killer = threading.Timer(0.15, lambda: ray.kill(adversary, no_restart=False))  # a step takes about 0.5 s
    t0 = time.perf_counter()
    killer.start()
    second = saei_step(parts, prompts, step=2, progress=1.0)
    step_s = time.perf_counter() - t0
    killer.join()
    assert step_s > 0.15, "the step ended before the kill: it did not test a restart inside a step"
    assert ray.get(adversary.__ray_call__.remote(lambda self: __import__("os").getpid())) != pid
    assert pool.version == 2
    # a kill that lands in the step's weight sync leaves the restarted actor on the folder's weights
    # until its next attack, which names the version and brings the weights to catch up from
    responses = [torch.tensor([5, 6, 7])]
    ray.get(adversary.attack.remote(prompts[0], responses, 1.0, pool.version, [pool.weights_ref]))
    assert ray.get(adversary.weights_version.remote()) == 2
    for m in (first, second):
        for k in ("reward/adversarial", "accuracy/adversarial", "entropy/adversarial", "tsec/before", "tsec/after"):
            assert m[k] is not None and math.isfinite(m[k]), k
    # every prompt came back with n_clean + n_adv samples
    for m in (first, second):
        assert (m["samples/clean"], m["samples/adversarial"]) == (6, 6)
        assert m["samples/lost"] == m["samples/duplicated"] == 0
    pool.shutdown()
    ray.kill(adversary)


def test_saei_steps_with_vllm_rollouts_follow_the_learner(ray_cluster, tiny_policy_dir):
    """SaEI steps with vLLM engines in the rollout actors. The pool first serves other weights than the
    learner's, which `rollout/logprob_diff` (engine vs learner log-probs of the same samples) must show;
    after the step's weight sync the engine's raw log-probs equal the learner's: the load was exact."""
    pytest.importorskip("vllm")
    import torch

    from core.policy import load_policy

    ray = ray_cluster
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.kv_cache_gb=0.25", "rollout.n_clean=2",
                             "rollout.n_adv=2", "rollout.sampling.max_new_tokens=8", "learner.num_workers=0",
                             "learner.micro_batch_size=4", "cluster.rollout_workers=1", "cluster.rollout_cpus=1",
                             "cluster.adversary_cpus=1"])
    path = str(tiny_policy_dir)
    pool = RolloutPool(path, cfg)
    g = torch.Generator().manual_seed(5)
    pool.load_weights({k: v + 0.02 * torch.randn(v.shape, generator=g)
                       for k, v in load_policy(path).state_dict().items()})
    adversary = create_adversary_actor(path, cfg)
    parts = Parts(cfg=cfg, pool=pool, learner=LearnerGroup(path, cfg), adversary=adversary)
    prompts = _prompts(3)
    metrics = [saei_step(parts, prompts, step=s, progress=s / 3) for s in (1, 2, 3)]
    assert pool.version == 4
    for m in metrics:
        assert (m["samples/clean"], m["samples/adversarial"]) == (6, 6)
        assert m["samples/lost"] == m["samples/duplicated"] == 0
        for k in ("reward/adversarial", "entropy/clean", "entropy/adversarial", "tsec/before", "tsec/after"):
            assert m[k] is not None and math.isfinite(m[k]), k
    diffs = [m["rollout/logprob_diff"] for m in metrics]
    assert diffs[0] > 1e-2 and max(diffs[1:]) < 1e-5, diffs  # measured: ~2e-7 once synced
    pool.shutdown()
    ray.kill(adversary)
