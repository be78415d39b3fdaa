"""Weight sync: the object store against the broadcast (core.weights), same weights, same consumers, one run.

    python bench/weight_sync.py                                  # CPU: tiny policy and a ~1 GB shape, gloo
    python bench/weight_sync.py --shapes 3b --device cuda        # GPU host: the 3B-shaped policy, NCCL

A sender actor (standing in for learner rank 0) holds the weights; `--consumers` actors (standing in
for the rollout engines and the adversary) hold a copy of the same shapes and load every sync into
it. object_store: the sender `ray.put`s the state dict once and every consumer `ray.get`s and copies
it. broadcast: the sender streams packed buckets of `--bucket-mb` over one process group and every
consumer copies tensor by tensor as the buckets arrive. Each sync ends when every consumer holds the
new weights (checked bitwise on the last repeat). Median of `--repeats` after a warm-up sync (the
broadcast's warm-up also builds the group: its seconds are printed as `first`). Prints, per shape,
seconds, GB/s (weight bytes / seconds) and `broadcast_vs_object_store_<shape>=` (object-store
seconds over broadcast seconds: above 1 means the broadcast is faster); the last line is the ratio of
the largest shape, `broadcast_vs_object_store=`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import weights  # noqa: E402


def make_weights(shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The named tensors of a shape: `tiny` (the embedded policy), `1gb` (random, about 1 GiB) or `3b`."""
    torch.manual_seed(seed)
    if shape == "1gb":  # 64 x (2048 x 2048) float32 = 1 GiB, plus small vectors as real models have
        out = {}
        for i in range(64):
            out[f"layers.{i}.weight"] = torch.randn(2048, 2048, device=device).to(dtype)
            out[f"layers.{i}.norm"] = torch.randn(2048, device=device).to(dtype)
        return out
    from bench.shapes import build_policy

    # a folder per process: the sender and every consumer build the same policy at once
    folder = Path(tempfile.gettempdir()) / "saei-bench" / f"ws-{shape}-{os.getpid()}"
    try:
        model, _ = build_policy(shape, folder, 112, device=device, dtype=dtype)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@ray.remote
class Member:
    """The sender (rank 0) or a consumer: holds one copy of the weights."""

    def __init__(self, shape: str, dtype: str, device: str, seed: int):
        torch.set_num_threads(1)
        self.state = make_weights(shape, getattr(torch, dtype), device, seed)
        self.group = None

    def endpoint(self) -> tuple[str, int]:
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.state.values())

    def perturb(self) -> None:  # the sender's new weights for the next sync
        for v in self.state.values():
            v.add_(1)

    def put(self) -> list[ray.ObjectRef]:
        return [ray.put({k: v.cpu() for k, v in self.state.items()})]

    def load(self, box: list[ray.ObjectRef]) -> None:
        new = ray.get(box[0])
        with torch.no_grad():
            for k, v in self.state.items():
                v.copy_(new[k])

    def send(self, info: weights.GroupInfo, version: int, bucket_bytes: int) -> float:
        self.group = weights.join(self.group, info, 0)
        meta = [(k, tuple(v.shape), v.dtype) for k, v in self.state.items()]
        m = weights.send(self.group, iter(self.state.items()), meta, version, bucket_bytes)
        return float(sum(m.bucket_sizes))

    def receive(self, info: weights.GroupInfo, rank: int) -> int:
        self.group = weights.join(self.group, info, rank)
        return weights.receive_into(self.group, self.state).version

    def fingerprint(self) -> list[float]:
        return [float(v.double().sum()) for v in self.state.values()]


def bench_shape(shape: str, args) -> dict:
    device = args.device
    res = {"num_gpus": 1.0 / (args.consumers + 1)} if device == "cuda" else {"num_cpus": 0}
    sender = Member.options(**res).remote(shape, args.dtype, device, 1)
    consumers = [Member.options(**res).remote(shape, args.dtype, device, 0) for _ in range(args.consumers)]
    nbytes = ray.get(sender.nbytes.remote())
    ray.get([c.nbytes.remote() for c in consumers])

    def object_store() -> float:
        ray.get(sender.perturb.remote())
        t = time.perf_counter()
        box = ray.get(sender.put.remote())
        ray.get([c.load.remote(box) for c in consumers])
        return time.perf_counter() - t

    host, port = ray.get(sender.endpoint.remote())
    info = weights.GroupInfo(group_id=f"bench-{shape}", host=host, port=port, world_size=1 + args.consumers,
                             backend="nccl" if device == "cuda" else "gloo", timeout_s=600)
    version = [0]

    def broadcast() -> float:
        ray.get(sender.perturb.remote())
        version[0] += 1
        t = time.perf_counter()
        refs = [c.receive.remote(info, i + 1) for i, c in enumerate(consumers)]
        ray.get([sender.send.remote(info, version[0], int(args.bucket_mb * 2**20))] + refs)
        return time.perf_counter() - t

    out = {"bytes": nbytes, "first_broadcast": broadcast(), "first_object_store": object_store()}
    for name, fn in (("object_store", object_store), ("broadcast", broadcast)):
        out[name] = statistics.median(fn() for _ in range(args.repeats))
    want = ray.get(sender.fingerprint.remote())
    assert all(ray.get(c.fingerprint.remote()) == want for c in consumers), "a consumer missed the last sync"
    for a in [sender, *consumers]:
        ray.kill(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,1gb", help="comma-separated: tiny, 1gb, 3b")
    ap.add_argument("--consumers", type=int, default=3, help="rollout engines + adversary")
    ap.add_argument("--bucket-mb", type=float, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    results = {s: bench_shape(s, args) for s in shapes}
    ray.shutdown()
    print(f"{args.consumers} consumers, bucket {args.bucket_mb:g} MiB, {args.dtype} on {args.device}, "
          f"median of {args.repeats} after a warm-up")
    for s, r in results.items():
        gb = r["bytes"] / 1e9
        for name in ("object_store", "broadcast"):
            print(f"[{s}] {gb:.3f} GB {name:12s} {r[name]:8.3f} s  {gb / r[name]:7.2f} GB/s  "
                  f"(first {r['first_' + name]:.3f} s)")
        print(f"broadcast_vs_object_store_{s}={r['object_store'] / r['broadcast']:.3f}")
    last = results[shapes[-1]]
    print(f"broadcast_vs_object_store={last['object_store'] / last['broadcast']:.3f}")


if __name__ == "__main__":
    main()
