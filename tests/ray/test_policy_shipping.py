"""The policy folder reaches each role through Ray's object store, not through the driver's disk.

The driver packs the folder (core.node_cache.policy_folder with ray.put) and then the folder is renamed
away: a rollout actor, the adversary and a learner rank started afterwards can only have loaded the
policy from the object store into their node cache (a private one per test, given through runtime_env).
What they serve is compared with the same policy loaded in this process.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch

from actors.rollout import Rollout, RolloutActor, RolloutRequest
from adversary.actor import AdversaryActor
from core import synthetic
from core.batch import Prompt
from core.config import load_config
from core.node_cache import policy_folder
from core.policy import load_policy
from learner.group import LearnerActor


def _prompts(k: int) -> list[Prompt]:
    out = []
    for i in range(k):
        ex = synthetic.make_example(i, split="test")
        out.append(Prompt(uid=f"t:{i}", problem=ex.problem, answer=ex.answer, image=np.asarray(ex.image)))
    return out


def test_roles_load_a_packed_policy_whose_driver_folder_is_gone(ray_cluster, tiny_policy_dir, tmp_path):
    ray = ray_cluster
    src = tmp_path / "driver_only" / "policy"
    shutil.copytree(tiny_policy_dir, src)
    folder = policy_folder(src, put=ray.put)
    moved = tmp_path / "moved_away"
    src.parent.rename(moved)  # no process can open the driver's path any more
    assert not src.exists() and folder.packed is not None
    cache = tmp_path / "node_cache"
    env = {"env_vars": {"SAEI_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}}
    cfg = load_config(None, ["cluster.rollout_cpus=1", "cluster.adversary_cpus=1", "cluster.learner_cpus=1",
                             "rollout.sampling.max_new_tokens=5", "rollout.sampling.temperature=0",
                             "learner.num_workers=1", "learner.kl_coef=0"])

    rollout = RolloutActor.options(num_cpus=1, runtime_env=env).remote(folder, cfg)
    requests = [RolloutRequest(prompt=p, n=1, seed=3) for p in _prompts(2)]
    got, _ = ray.get(rollout.generate.remote(requests, cfg.rollout.sampling))
    want, _ = Rollout(str(moved / "policy"), cfg, device="cpu").generate(requests, cfg.rollout.sampling)
    assert [s.response_ids.tolist() for r in got for s in r] == [s.response_ids.tolist() for r in want for s in r]
    ray.kill(rollout)
    # one unpacked entry, named by the folder's content digest: the actors loaded it from there
    assert [p.name for p in (cache / "entries").iterdir()] == [folder.digest]

    adversary = AdversaryActor.options(num_cpus=1, runtime_env=env).remote(folder, cfg)
    assert ray.get(adversary.ready.remote())
    ray.kill(adversary)

    rank = LearnerActor.options(num_cpus=1, runtime_env=env).remote()
    addr, port = ray.get(rank.address.remote())
    assert ray.get(rank.setup.remote(folder, cfg, 0, 1, addr, port, 1))
    exported, _ = rank.export_weights.remote()
    state = ray.get(exported)
    expected = load_policy(moved / "policy", dtype=torch.float32).state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k].float(), expected[k]) for k in expected)
    ray.get(rank.close.remote())
    ray.kill(rank)
