"""The learner on CUDA: FSDP2 with bf16 compute over fp32 master weights, NCCL (marker gpu)."""

import numpy as np
import pytest
import torch

from core.batch import TrainBatch
from core.config import load_config
from core.policy import load_policy
from learner.worker import LearnerWorker

pytestmark = pytest.mark.gpu


def _batch(seed: int = 0, n: int = 8) -> TrainBatch:
    rng = np.random.default_rng(seed)
    return TrainBatch(
        problems=["<image>How many shapes are red?", "What is the angle x?<image>"],
        images=[rng.integers(0, 256, (56, 84, 3), dtype=np.uint8) for _ in range(2)],
        responses=[torch.from_numpy(rng.integers(20, 300, int(rng.integers(4, 12)))) for _ in range(n)],
        context=torch.from_numpy(rng.integers(0, 2, n)),
        advantages=torch.from_numpy(rng.normal(size=n).astype(np.float32)),
    )


def test_cuda_bf16_update_follows_the_cpu_fp32_update(tiny_policy_dir):
    overrides = ["learner.lr=1e-4", "learner.micro_batch_size=3"]
    gpu = LearnerWorker(tiny_policy_dir, load_config(None, overrides + ["cluster.learner_gpus=1"]), device="cuda")
    cpu = LearnerWorker(tiny_policy_dir, load_config(None, overrides), device="cpu")
    assert gpu.param_dtype == torch.bfloat16 and cpu.param_dtype == torch.float32
    batch = _batch()
    mg, mc = gpu.update(batch), cpu.update(batch)
    assert all(np.isfinite(v) for v in mg.values())
    assert mg["actor/loss"] == pytest.approx(mc["actor/loss"], rel=5e-2, abs=5e-3)
    assert mg["entropy/all"] == pytest.approx(mc["entropy/all"], rel=2e-2)
    assert all(v.dtype == torch.bfloat16 for v in gpu.export_weights().values())  # what the engines take
    # the fp32 master weights (the bf16 export rounds by more than one 1e-4 step)
    wg = {k.removeprefix("policy."): p.full_tensor().float().cpu() for k, p in gpu.model.named_parameters()}
    wc = {k.removeprefix("policy."): p.full_tensor() for k, p in cpu.model.named_parameters()}
    w0 = load_policy(tiny_policy_dir).state_dict()
    dg = torch.cat([(wg[k] - w0[k]).flatten() for k in wg])
    dc = torch.cat([(wc[k] - w0[k]).flatten() for k in wg])
    # bf16 compute changes small gradients' signs, and Adam's first step is sign-like: compare the
    # direction of the whole update rather than elementwise values
    cos = torch.nn.functional.cosine_similarity(dg, dc, dim=0)
    assert cos > 0.5, f"GPU and CPU updates point apart (cos {cos:.3f})"


def test_ray_learner_group_on_one_gpu(tiny_policy_dir):
    ray = pytest.importorskip("ray")
    from learner.group import LearnerGroup

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        cfg = load_config(None, ["learner.num_workers=1", "cluster.learner_gpus=1", "learner.lr=1e-4"])
        group = LearnerGroup(str(tiny_policy_dir), cfg)
        m = group.update(_batch(1))
        assert np.isfinite(m["actor/loss"]) and m["learner/tokens"] > 0
        weights = group.export_weights()
        fresh = load_policy(tiny_policy_dir)
        fresh.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
        group.shutdown()
    finally:
        ray.shutdown()
