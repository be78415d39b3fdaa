import numpy as np
import pytest
import torch

from adversary.actor import create_adversary_actor
from adversary.attack import Attacker
from core import synthetic
from core.batch import Prompt
from core.config import load_config
from core.members import check_served
from core.policy import load_policy, load_processor
from core.weights import fingerprint


def test_actor_returns_the_in_process_image_and_takes_weights(ray_cluster, tiny_policy_dir):
    ray = ray_cluster
    cfg = load_config(None, ["cluster.adversary_cpus=1"])
    ex = synthetic.make_example(7, split="test")
    prompt = Prompt(uid="t:7", problem=ex.problem, answer=ex.answer, image=np.asarray(ex.image))
    processor = load_processor(tiny_policy_dir)
    tok = processor.tokenizer
    responses = [torch.tensor(tok(t + "<|im_end|>")["input_ids"]) for t in
                 ("There are 3 red shapes. \\boxed{3}", "\\boxed{4}", "x = 5 + 2 = 7. \\boxed{7}")]

    local = Attacker(load_policy(tiny_policy_dir), processor, cfg.adversary, cfg.data.format_prompt, seed=cfg.run.seed)
    expected = local.attack(prompt, responses)

    actor = create_adversary_actor(str(tiny_policy_dir), cfg)
    got = ray.get(actor.attack.remote(prompt, responses))
    assert np.array_equal(got.image, expected.image)
    assert got.metrics["tsec/after"] == expected.metrics["tsec/after"]
    assert (got.weights_version, got.weights_fingerprint) == (0, None)  # the folder's: nothing to check

    # new weights change the attack exactly as they change the local copy
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in load_policy(tiny_policy_dir).state_dict().items()}
    local.load_weights(state)
    ray.get(actor.load_weights.remote(ray.put(state)))
    after_local = local.attack(prompt, responses)
    after_actor = ray.get(actor.attack.remote(prompt, responses))
    assert np.array_equal(after_actor.image, after_local.image)
    assert after_actor.metrics["tsec/before"] != expected.metrics["tsec/before"]
    assert (after_actor.weights_version, after_actor.weights_fingerprint) == (-1, fingerprint(state))
    ray.kill(actor)


def test_restarted_actor_catches_up_on_the_weights_it_is_asked_for(ray_cluster, tiny_policy_dir):
    ray = ray_cluster
    cfg = load_config(None, ["cluster.adversary_cpus=1", "cluster.max_restarts=2"])
    ex = synthetic.make_example(3, split="test")
    prompt = Prompt(uid="t:3", problem=ex.problem, answer=ex.answer, image=np.asarray(ex.image))
    processor = load_processor(tiny_policy_dir)
    responses = [torch.tensor(processor.tokenizer(t + "<|im_end|>")["input_ids"]) for t in ("\\boxed{2}", "two \\boxed{5}")]
    torch.manual_seed(0)
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in load_policy(tiny_policy_dir).state_dict().items()}
    local = Attacker(load_policy(tiny_policy_dir), processor, cfg.adversary, cfg.data.format_prompt, seed=cfg.run.seed)
    stale = local.attack(prompt, responses)
    local.load_weights(state)
    fresh = local.attack(prompt, responses)
    assert not np.array_equal(stale.image, fresh.image)

    actor = create_adversary_actor(str(tiny_policy_dir), cfg)
    ref = ray.put(state)
    ray.get(actor.load_weights.remote(ref, 1))
    pending = actor.attack.remote(prompt, responses, 0.0, 1, [ref])
    # dies mid-call: Ray restarts it (the folder's weights again) and runs the call again, whose
    # version makes the new actor catch up first
    ray.kill(actor, no_restart=False)
    got = ray.get(pending)
    assert np.array_equal(got.image, fresh.image)
    again = ray.get(actor.attack.remote(prompt, responses, 0.0, 1, [ref]))
    assert ray.get(actor.weights_version.remote()) == 1
    assert np.array_equal(again.image, fresh.image)
    # every answer names the weights it was computed with, which the driver checks against the learner's
    for result in [got, again, *ray.get(actor.attack_many.remote([(prompt, responses)] * 2, 0.0, 1, [ref]))]:
        assert (result.weights_version, result.weights_fingerprint) == (1, fingerprint(state))
        assert check_served("adversary", result.weights_version, result.weights_fingerprint, {1: fingerprint(state)})
    with pytest.raises(RuntimeError, match=r"adversary served weights version 1 with fingerprint \w+, the learner"):
        check_served("adversary", again.weights_version, again.weights_fingerprint,
                     {1: fingerprint(load_policy(tiny_policy_dir).state_dict())})
    ray.kill(actor)
