"""core.weights over NCCL (marker gpu): one sender and one receiver on two GPUs, bf16 and fp32 buckets.

NCCL needs a device per rank, so this needs two GPUs; the gloo path runs on CPU in tests/integration/test_weights.py.
"""


import pytest
import torch
import torch.multiprocessing as mp

from core.devices import free_port

pytestmark = pytest.mark.gpu



def _weights(device):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(1024, 1024, generator=g).to(device, torch.bfloat16),
            "b": torch.randn(1024, generator=g).to(device), "n": torch.arange(5, device=device)}


def _member(rank, info, out):
    from core import weights

    torch.cuda.set_device(rank)
    w = _weights(f"cuda:{rank}")
    group = weights.WeightGroup(info, rank)
    if rank == 0:
        weights.send(group, iter(w.items()), [(k, tuple(v.shape), v.dtype) for k, v in w.items()], 3, 2**20)
        out.put((0, True))
        return
    state = {k: torch.zeros_like(v) for k, v in w.items()}
    manifest = weights.receive_into(group, state)
    out.put((1, manifest.version == 3 and all(torch.equal(state[k], w[k]) for k in w)))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank")
def test_nccl_sync_is_bitwise():
    from core.weights import GroupInfo

    info = GroupInfo("gpu-test", "127.0.0.1", free_port(), 2, backend="nccl", timeout_s=120)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(r, info, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in range(2))
    for p in procs:
        p.join(timeout=60)
    assert results == {0: True, 1: True}
