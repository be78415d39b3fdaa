"""cluster.placement: configs that could put two ranks of one NCCL group on one GPU are refused."""

from pathlib import Path

import pytest

from cluster.placement import check_placement, gpu_demand, placement_problems, role_requests
from core.config import ConfigError, load_config

SEVEN_B = Path(__file__).resolve().parents[2] / "configs" / "geo3k_qwen2_5_vl_7b.yaml"


def test_the_7b_config_fits_8_gpus_with_whole_gpus_for_every_broadcast_member():
    cfg = load_config(SEVEN_B)
    check_placement(cfg)
    assert gpu_demand(cfg) == 8
    req = role_requests(cfg)
    assert (len(req["learner"]), len(req["rollout"]), len(req["adversary"])) == (3, 4, 1)
    members = [req["learner"][0], *req["rollout"], *req["adversary"]]
    assert all(r["GPU"] >= 1 and r["GPU"] == int(r["GPU"]) for r in members)


def test_the_old_7b_placement_is_refused_naming_the_keys():
    # 4 learner ranks at 0.9 and the adversary at 0.1: Ray may put the adversary on rank 0's GPU
    cfg = load_config(SEVEN_B, ["learner.num_workers=4", "cluster.learner_gpus=0.9", "cluster.adversary_gpus=0.1"])
    assert gpu_demand(cfg) == pytest.approx(7.7)  # it fits 8 GPUs: only the sharing is wrong
    with pytest.raises(ConfigError) as err:
        check_placement(cfg)
    text = str(err.value)
    assert "cluster.adversary_gpus=0.1" in text and "cluster.weight_sync" in text and "NCCL" in text
    assert "cluster.rollout_gpus" not in text


def test_fractional_or_cpu_rollout_in_an_nccl_broadcast_is_refused():
    base = ["cluster.weight_sync=broadcast", "cluster.learner_gpus=1", "rollout.n_adv=0"]
    assert any("cluster.rollout_gpus=0.5" in p for p in placement_problems(load_config(None, base + ["cluster.rollout_gpus=0.5"])))
    assert any("from the CPU" in p for p in placement_problems(load_config(None, base + ["cluster.rollout_gpus=0"])))
    assert placement_problems(load_config(None, base + ["cluster.rollout_gpus=1"])) == []
    # no adversary (n_adv = 0): its fraction does not matter
    assert placement_problems(load_config(None, base + ["cluster.rollout_gpus=2", "cluster.adversary_gpus=0.3"])) == []


def test_tensor_parallel_workers_need_a_gpu_each():
    cfg = load_config(None, ["cluster.weight_sync=broadcast", "cluster.learner_gpus=1", "cluster.rollout_gpus=1",
                             "cluster.adversary_gpus=1", "rollout.engine=vllm", "rollout.tensor_parallel_size=2"])
    assert any("rollout.tensor_parallel_size=2" in p for p in placement_problems(cfg))


def test_fractions_are_fine_without_nccl_between_roles():
    for overrides in (["cluster.weight_sync=object_store", "cluster.rollout_gpus=0.5", "cluster.adversary_gpus=0.1",
                       "cluster.learner_gpus=0.9"],
                      ["cluster.weight_sync=broadcast", "cluster.rollout_gpus=0.5", "cluster.adversary_gpus=0.1"]):
        check_placement(load_config(None, overrides))  # object store, or a learner on CPU (gloo)
    check_placement(load_config(None, []))  # the embedded default: all on CPU


def test_learner_ranks_of_half_a_gpu_could_share_one():
    cfg = load_config(None, ["learner.num_workers=2", "cluster.learner_gpus=0.5"])
    assert any("cluster.learner_gpus=0.5 with learner.num_workers=2" in p for p in placement_problems(cfg))
    assert placement_problems(load_config(None, ["learner.num_workers=1", "cluster.learner_gpus=0.5"])) == []
    assert placement_problems(load_config(None, ["learner.num_workers=2", "cluster.learner_gpus=0.6"])) == []
