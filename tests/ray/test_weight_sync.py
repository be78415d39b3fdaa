"""cluster.weight_sync=broadcast on a real local Ray cluster: gloo groups of learner rank 0, the rollout
engines' processes and the adversary.

The learner starts from moved weights (folder B) while the pool and the adversary serve the folder's
(A), so a sync must bring B everywhere: bitwise into transformers engines and the adversary, and into
vLLM engines so that their raw log-probs are B's; a resume from a checkpoint goes the same way. Faults:
a receiver whose manifest differs (named, nothing loaded), a version the driver did not announce, a
receiver killed mid-broadcast (the sync goes through the object store, the next one builds a new
group), a restarted member catching up.
"""

import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch

from actors.pool import RolloutPool, RolloutRequest
from adversary.actor import create_adversary_actor
from cluster.pipeline import Parts
from core import synthetic
from core.batch import Prompt
from core.config import load_config
from core.policy import load_policy
from core.weights import ManifestMismatch
from learner.group import LearnerGroup


@pytest.fixture(scope="module")
def moved(tiny_policy_dir, tmp_path_factory):
    """Folder B: the tiny policy with every weight moved."""
    b = tmp_path_factory.mktemp("moved") / "b"
    shutil.copytree(tiny_policy_dir, b)
    model = load_policy(tiny_policy_dir)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(b)
    return b


def _cfg(*extra):
    # fractional CPUs: 2 learner ranks, 2 rollout actors and the adversary on the 2-CPU test cluster
    return load_config(None, ["cluster.weight_sync=broadcast", "cluster.weight_bucket_mb=0.25",
                              "cluster.weight_sync_timeout_s=20", "cluster.rollout_workers=2",
                              "cluster.rollout_cpus=0.3", "cluster.adversary_cpus=0.3", "cluster.learner_cpus=0.3",
                              "learner.num_workers=2", "rollout.sampling.max_new_tokens=6", "cluster.max_restarts=3",
                              *extra])


def _state(ray, actor, which: str) -> dict:
    """The weights a rollout actor's engine or the adversary serves."""
    def read(self):
        model = self.rollout.engine.model if which == "rollout" else self.attacker.policy
        return {k: v.clone() for k, v in model.state_dict().items()}

    return ray.get(actor.__ray_call__.remote(read))


def _assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


ROLLOUT, ADVERSARY = "rollout", "adversary"


@pytest.fixture(scope="module")
def parts(ray_cluster, tiny_policy_dir, moved):
    cfg = _cfg()
    pool = RolloutPool(str(tiny_policy_dir), cfg)
    adversary = create_adversary_actor(str(tiny_policy_dir), cfg)
    learner = LearnerGroup(str(moved), cfg)  # FSDP2 over 2 ranks: the broadcast streams from the shards
    p = Parts(cfg=cfg, pool=pool, learner=learner, adversary=adversary)
    yield p
    pool.shutdown()
    learner.shutdown()
    ray_cluster.kill(adversary)


def test_broadcast_brings_the_learners_weights_everywhere_bitwise(parts, ray_cluster, moved):
    ray = ray_cluster
    want = load_policy(moved).state_dict()
    assert not torch.equal(_state(ray, parts.pool.actors[0], ROLLOUT)["lm_head.weight"], want["lm_head.weight"])
    metrics = parts.weights.sync()
    assert metrics["weight_sync/fallbacks"] == 0 and metrics["weight_sync/bytes"] >= 4 * sum(
        v.numel() for v in want.values())
    assert parts.pool.version == 1 and parts.pool.weights_ref is None  # no object-store copy was made
    for actor in parts.pool.actors:
        _assert_same(_state(ray, actor, ROLLOUT), want)
        assert ray.get(actor.__ray_call__.remote(lambda self: self.held.version)) == 1
    _assert_same(_state(ray, parts.adversary, ADVERSARY), want)
    assert ray.get(parts.adversary.weights_version.remote()) == 1
    group = parts.weights.group
    parts.weights.sync()  # the same membership: the same group, version 2
    assert parts.weights.group is group and parts.pool.version == 2


def test_a_version_the_driver_did_not_announce_is_refused(parts, ray_cluster):
    ray = ray_cluster
    parts.weights.sync()  # the group exists and every member is in it
    info, (a0, a1), adv = parts.weights.group, parts.pool.actors, parts.adversary
    v = parts.pool.version
    refs = [a0.receive_weights.remote(info, 1, v + 1), a1.receive_weights.remote(info, 2, v + 1),
            adv.receive_weights.remote(info, 3, v + 7)]
    parts.learner.broadcast_weights(info, v + 1, 2**18, timeout=60)
    ray.get(refs[:2])
    with pytest.raises(RuntimeError, match=f"sent version {v + 1}, the driver announced {v + 7}"):
        ray.get(refs[2])
    parts.weights.sync()  # the next sync still works (the adversary is brought to a known version)
    assert ray.get(adv.weights_version.remote()) == parts.pool.version


def test_a_manifest_mismatch_names_the_tensor_and_loads_nothing(ray_cluster, tiny_policy_dir, moved):
    ray = ray_cluster
    cfg = _cfg("cluster.rollout_workers=1", "learner.num_workers=0")
    bf16 = _cfg("cluster.rollout_workers=1", "model.dtype=bfloat16")  # serves bfloat16; the learner sends float32
    pool = RolloutPool(str(tiny_policy_dir), bf16)
    learner = LearnerGroup(str(moved), cfg)
    parts = Parts(cfg=cfg, pool=pool, learner=learner, adversary=None)
    before = _state(ray, pool.actors[0], ROLLOUT)
    with pytest.raises(ManifestMismatch, match=r"is float32\[.*\] in the sync, this receiver serves bfloat16"):
        parts.weights.sync()
    _assert_same(_state(ray, pool.actors[0], ROLLOUT), before)  # still the weights it had
    assert pool.version == 0
    pool.shutdown()


def test_a_resume_brings_the_checkpoint_to_the_engines_through_the_weight_sync(ray_cluster, tiny_policy_dir, moved,
                                                                               tmp_path):
    """The job's resume (cluster.job.resume_learner): the learner loads a checkpoint of B while the pool serves
    the folder's A; the pool gets B through the configured transport, a broadcast here (no object-store
    copy), and answers are checked against the learner's fingerprint of B."""
    from cluster.job import resume_learner

    ray = ray_cluster
    cfg = _cfg("cluster.rollout_workers=1", "learner.num_workers=0")
    ckpt = tmp_path / "step_000003"
    LearnerGroup(str(moved), cfg).save(str(ckpt), {"step": 3, "cursor": {"epoch": 0, "pos": 2}})
    pool = RolloutPool(str(tiny_policy_dir), cfg)
    parts = Parts(cfg=cfg, pool=pool, learner=LearnerGroup(str(tiny_policy_dir), cfg), adversary=None)
    want = load_policy(moved).state_dict()
    assert not torch.equal(_state(ray, pool.actors[0], ROLLOUT)["lm_head.weight"], want["lm_head.weight"])
    client = resume_learner(parts, ckpt)
    assert client == {"step": 3, "cursor": {"epoch": 0, "pos": 2}}
    assert pool.version == 1 and pool.weights_ref is None and parts.weights.group is not None  # broadcast
    _assert_same(_state(ray, pool.actors[0], ROLLOUT), want)
    pool.generate([RolloutRequest(p, 1, seed=i) for i, p in enumerate(_prompts(2))])  # served weights checked
    pool.shutdown()


def _prompts(k):
    out = []
    for i in range(k):
        ex = synthetic.make_example(i, split="test")
        out.append(Prompt(uid=f"t:{i}", problem=ex.problem, answer=ex.answer, image=np.asarray(ex.image)))
    return out


def _wait_restarted(ray, actor, timeout=120.0):
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(actor.ready.remote(), timeout=30)
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_receiver_killed_mid_broadcast_falls_back_and_the_next_sync_rebuilds(parts, ray_cluster, moved):
    ray = ray_cluster
    parts.weights.sync()  # a working group
    group = parts.weights.group
    victim = parts.pool.actors[1]
    pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()))
    send = parts.learner.broadcast_weights

    def kill_then_send(*args, **kwargs):  # the receivers are waiting in the broadcast: one dies
        os.kill(pid, signal.SIGKILL)
        return send(*args, **kwargs)

    parts.learner.broadcast_weights = kill_then_send
    try:
        metrics = parts.weights.sync()
    finally:
        parts.learner.broadcast_weights = send
    assert metrics["weight_sync/fallbacks"] == 1 and parts.weights.group is None
    version = parts.pool.version
    want = load_policy(moved).state_dict()
    _wait_restarted(ray, victim)  # else every request may go to the other actor and the victim never serves
    # every request is answered with this version's weights: the restarted actor catches up first
    requests = [RolloutRequest(p, 1, seed=i) for i, p in enumerate(_prompts(4))]
    parts.pool.generate(requests, chunk=1)
    for actor in parts.pool.actors:
        assert ray.get(actor.__ray_call__.remote(lambda self: self.held.version)) == version
        _assert_same(_state(ray, actor, ROLLOUT), want)
    metrics = parts.weights.sync()  # a new group, the restarted actor in it
    assert metrics["weight_sync/fallbacks"] == 1 and parts.weights.group is not group
    assert parts.pool.version == version + 1 and parts.pool.weights_ref is None


def test_vllm_engines_receive_the_broadcast(ray_cluster, tiny_policy_dir, moved):
    """Two in-process vLLM engines (CPU) receive the broadcast: their raw log-probs become B's."""
    pytest.importorskip("vllm")
    from actors.engines.hf import HFEngine

    # 0.2 CPU each: the module's parts still hold 1.5 of the cluster's 2
    cfg = _cfg("rollout.engine=vllm", "rollout.kv_cache_gb=0.25", "learner.num_workers=0", "cluster.rollout_cpus=0.2")
    pool = RolloutPool(str(tiny_policy_dir), cfg)
    parts = Parts(cfg=cfg, pool=pool, learner=LearnerGroup(str(moved), cfg), adversary=None)
    requests = [RolloutRequest(p, 2, seed=i) for i, p in enumerate(_prompts(4))]
    before, _ = pool.generate(requests, chunk=1)
    assert parts.weights.sync()["weight_sync/fallbacks"] == 0
    after, _ = pool.generate(requests, chunk=1)  # over both actors
    reference = HFEngine(moved, dtype="float32")
    from core.policy import chat_prompt, encode_prompt_response

    rows = [r for r in requests for _ in range(r.n)]
    samples = [s for group in after for s in group]
    inputs, mask = encode_prompt_response(reference.processor, [chat_prompt(reference.processor, r.prompt.problem,
                                                                             cfg.data.format_prompt) for r in rows],
                                          [r.prompt.image for r in rows], [s.response_ids for s in samples])
    with torch.no_grad():
        logp = reference.model(**inputs).logits.float()[:, :-1].log_softmax(-1)
    want = logp.gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    err = max(float((s.logprobs - want[i][mask[i, 1:]]).abs().max()) for i, s in enumerate(samples))
    assert err < 1e-4, err
    assert [[s.response_ids.tolist() for s in g] for g in after] != [[s.response_ids.tolist() for s in g] for g in before]
    pool.shutdown()
