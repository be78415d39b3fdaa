"""The 7B config's placement on a local Ray cluster with 8 logical GPUs: every member of the NCCL
weight-broadcast group on a GPU of its own, and all roles placed (they fit 8 GPUs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEVEN_B = REPO / "configs" / "geo3k_qwen2_5_vl_7b.yaml"


def _probe(*overrides: str) -> dict[str, list[list[str]]]:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(REPO / "tests/ray/placement_probe.py"), str(SEVEN_B), *overrides],
                         capture_output=True, text=True, timeout=400, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_7b_config_puts_each_broadcast_member_on_its_own_gpu_within_8():
    placed = _probe()
    assert [len(placed[r]) for r in ("learner", "rollout", "adversary")] == [3, 4, 1]
    members = [placed["learner"][0], *placed["rollout"], *placed["adversary"]]
    assert all(len(ids) == 1 for ids in members), members
    assert len({ids[0] for ids in members}) == len(members), members  # no two share a GPU id
    everyone = [ids[0] for role in placed.values() for ids in role]
    assert len(set(everyone)) == 8 and set(everyone) <= {str(i) for i in range(8)}, placed


def test_old_fractional_placement_puts_the_adversary_beside_a_learner_rank():
    # the premise of cluster.placement's rule: with 0.9-GPU learner ranks filling 4 GPUs and 4 whole-GPU
    # engines the other 4, Ray can only put the 0.1-GPU adversary on a learner rank's GPU (rank 0's is
    # one of those four), which check_placement refuses for a broadcast-group member
    placed = _probe("learner.num_workers=4", "cluster.learner_gpus=0.9", "cluster.adversary_gpus=0.1")
    learner_gpus = {ids[0] for ids in placed["learner"]}
    assert len(learner_gpus) == 4
    assert placed["adversary"][0][0] in learner_gpus, placed
