"""Run by test_gpu_placement.py in a process of its own (the other tests share one 2-CPU cluster without
GPUs): a local Ray cluster with 8 logical GPUs, one lightweight actor per role instance asking for what
that role asks for (cluster.placement.role_requests; the learner ranks as bundles of one PACK placement
group, as learner/group.py makes them), and the GPU ids Ray gave each, as JSON on the last line.

    python tests/ray/placement_probe.py <config.yaml> [key=value ...]
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402
from ray.util.placement_group import placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

from cluster.placement import role_requests  # noqa: E402
from core.config import load_config  # noqa: E402


@ray.remote
class Role:
    def gpu_ids(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]


def place(cfg) -> dict[str, list[list[str]]]:
    req = role_requests(cfg)
    actors: dict[str, list] = {"learner": [], "rollout": [], "adversary": []}
    if req["learner"]:
        pg = placement_group([dict(b) for b in req["learner"]], strategy="PACK")
        ray.get(pg.ready(), timeout=120)
        actors["learner"] = [Role.options(num_cpus=b["CPU"], num_gpus=b["GPU"], scheduling_strategy=
                                          PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote()
                             for i, b in enumerate(req["learner"])]
    for role in ("rollout", "adversary"):
        actors[role] = [Role.options(num_cpus=r["CPU"], num_gpus=r["GPU"]).remote() for r in req[role]]
    return {role: ray.get([a.gpu_ids.remote() for a in group], timeout=180) for role, group in actors.items()}


if __name__ == "__main__":
    cfg = load_config(sys.argv[1], sys.argv[2:])
    cpus = sum(r["CPU"] for reqs in role_requests(cfg).values() for r in reqs)
    ray.init(address="local", num_cpus=int(cpus) + 1, num_gpus=8, include_dashboard=False,
             _node_ip_address="127.0.0.1", logging_level="ERROR")
    try:
        print(json.dumps(place(cfg)))
    finally:
        ray.shutdown()
