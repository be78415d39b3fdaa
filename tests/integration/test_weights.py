"""core.weights: the bucket plan and packing (pure), and real syncs over a gloo group of 3 processes."""

import time

import pytest
import torch
import torch.multiprocessing as mp

from core import weights
from core.devices import free_port
from core.weights import (
    GroupInfo,
    Manifest,
    ManifestMismatch,
    WeightGroup,
    dtype_name,
    finish,
    pack,
    plan,
    receive,
    send,
    unpack,
)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(7, 5, generator=g), "a.bias": torch.randn(5, generator=g).to(torch.bfloat16),
            "steps": torch.arange(3, dtype=torch.int64), "b.weight": torch.randn(64, 33, generator=g),
            "empty": torch.zeros(0, 4), "c.weight": torch.randn(3, generator=g).to(torch.float16)}


def _meta(w):
    return [(k, tuple(v.shape), v.dtype) for k, v in w.items()]


def _expected(w):
    return {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in w.items()}


def test_plan_packs_in_order_aligned_within_bucket_size():
    w = _weights()
    m = plan(_meta(w), version=3, bucket_bytes=512)
    assert [e.name for e in m.entries] == list(w)
    assert all(e.offset % 64 == 0 for e in m.entries)
    for b, size in enumerate(m.bucket_sizes):
        inside = [e for e in m.entries if e.bucket == b]
        assert size == max(e.offset + e.nbytes for e in inside)
        assert size <= 512 or len(inside) == 1  # only a tensor larger than a bucket exceeds it, alone
    big = next(e for e in m.entries if e.name == "b.weight")  # 64 x 33 x 4 bytes > 512
    assert m.bucket_sizes[big.bucket] == big.nbytes == 64 * 33 * 4
    # a bucket per tensor at 1 byte, everything in one at 1 MB
    assert len(plan(_meta(w), 3, 1).bucket_sizes) == sum(v.numel() > 0 for v in w.values())  # empty ones ride along
    assert len(plan(_meta(w), 3, 2**20).bucket_sizes) == 1
    assert Manifest.from_bytes(m.to_bytes()) == m


def test_pack_unpack_round_trip_is_bitwise_for_every_dtype():
    w = _weights()
    m = plan(_meta(w), 1, 300)
    got = {}
    for b in range(len(m.bucket_sizes)):
        got.update(unpack(m, b, pack(m, b, w, torch.device("cpu"))))
    assert list(got) == list(w)
    for k, v in w.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


def test_manifest_check_names_the_tensor():
    w = _weights()
    m = plan(_meta(w), 5, 256)
    m.check(_expected(w))
    with pytest.raises(ManifestMismatch, match=r"version 5: 1 missing tensor\(s\) \['extra'\], 0 unexpected"):
        m.check({**_expected(w), "extra": ((1,), "float32")})
    with pytest.raises(ManifestMismatch, match=r"1 unexpected \['steps'\]"):
        m.check({k: v for k, v in _expected(w).items() if k != "steps"})
    bad = _expected(w)
    bad["a.weight"] = ((5, 7), "float32")
    with pytest.raises(ManifestMismatch, match=r"a.weight is float32\[7, 5\] in the sync, this receiver serves float32\[5, 7\]"):
        m.check(bad)
    bad = _expected(w)
    bad["a.bias"] = ((5,), "float32")
    with pytest.raises(ManifestMismatch, match=r"a.bias is bfloat16\[5\]"):
        m.check(bad)



# The receivers' own address (rank 0's is info.host, 127.0.0.1): another loopback address, one this
# host does not have (TEST-NET-1), and that unbindable one with GLOO_SOCKET_IFNAME=lo, which wins.
_OWN_HOST = {"own_host": "127.0.0.2", "unbindable": "192.0.2.123", "ifname": "192.0.2.123"}


def _member(rank: int, info: GroupInfo, mode: str, out) -> None:
    """One process of a sync: rank 0 sends _weights(1) as version 7, the others receive."""
    import os

    torch.set_num_threads(1)
    if mode == "ifname":
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    w = _weights(1)
    try:
        group = WeightGroup(info, rank, own_host=_OWN_HOST.get(mode) if rank > 0 else None)
        if rank == 0:
            if mode == "sender_streams":  # tensors made one by one as their bucket leaves
                named = ((k, v.clone()) for k, v in w.items())
            else:
                named = iter(w.items())
            send(group, named, _meta(w), version=7, bucket_bytes=256)
            out.put((rank, "sent", None))
            return
        expected = _expected(w)
        if mode == "mismatch" and rank == 2:
            expected["a.weight"] = ((1, 35), "float32")
        manifest, tensors = receive(group, expected)
        got = {}
        for i, (name, t) in enumerate(tensors):
            if mode == "die" and rank == 2 and i == 2:
                import os

                os._exit(1)  # a receiver killed mid-sync
            got[name] = t.clone()
        finish(group, ok=True)
        out.put((rank, "received", {k: bool(torch.equal(v, w[k])) for k, v in got.items()} | {"version": manifest.version}))
    except Exception as err:  # noqa: BLE001 (reported to the test)
        out.put((rank, type(err).__name__, str(err)))


def _run(mode: str, timeout_s: float = 20.0) -> dict:
    info = GroupInfo(group_id=f"test-{mode}", host="127.0.0.1", port=free_port(), world_size=3,
                     timeout_s=timeout_s)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(r, info, mode, out)) for r in range(3)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + 120
    while len(results) < 3 and time.monotonic() < deadline:
        try:
            rank, kind, detail = out.get(timeout=1)
            results[rank] = (kind, detail)
        except Exception:  # noqa: BLE001 (queue.Empty)
            if mode == "die" and len(results) == 2:
                break
    for p in procs:
        p.join(timeout=30)
    return results


@pytest.mark.parametrize("mode", ["plain", "sender_streams", "own_host", "ifname"])
def test_a_sync_reaches_every_receiver_bitwise(mode):
    results = _run(mode)
    assert results[0] == ("sent", None)
    for r in (1, 2):
        kind, detail = results[r]
        assert kind == "received", results[r]
        assert detail.pop("version") == 7 and len(detail) == 6 and all(detail.values()), detail


def test_a_rejected_manifest_moves_nothing_and_names_the_tensor():
    results = _run("mismatch")
    assert results[2][0] == "ManifestMismatch" and "a.weight is float32[7, 5]" in results[2][1]
    assert results[1][0] == "SyncAborted" and "another receiver rejected" in results[1][1]
    assert results[0][0] == "SyncAborted" and "rejected the manifest" in results[0][1]


def test_each_receiver_binds_its_own_address_not_the_senders():
    """A receiver's device is on the address it is given: one this host lacks cannot be bound (with
    rank 0's address, as before, it would have been; on a cluster that was the bug)."""
    results = _run("unbindable", timeout_s=5.0)
    for r in (1, 2):
        assert results[r][0] not in ("received", "sent") and "192.0.2.123" in results[r][1], results[r]
    assert results[0][0] != "sent", results


def test_a_receiver_that_dies_mid_sync_does_not_hang_the_sender():
    t0 = time.monotonic()
    results = _run("die", timeout_s=10.0)
    assert 2 not in results  # it died
    assert results[0][0] != "sent", results  # the sender raised instead of hanging ...
    assert time.monotonic() - t0 < 60  # ... within the group's timeout


def test_fingerprint_is_order_free_and_sees_any_change():
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(100_000, generator=g), "c": torch.zeros(2, dtype=torch.bfloat16)}
    fp = weights.fingerprint(sd)
    assert weights.fingerprint(list(reversed(list(sd.items())))) == fp
    assert weights.fingerprint({k: v.clone() for k, v in sd.items()}) == fp
    moved = dict(sd, b=sd["b"] + 1e-3)  # an optimizer step moves (nearly) every element
    assert weights.fingerprint(moved) != fp
    assert weights.fingerprint(dict(sd, a=sd["a"].double())) != fp  # the dtype is part of it
    assert weights.fingerprint({"renamed": sd["a"], "b": sd["b"], "c": sd["c"]}) != fp
