"""Weights in packed, versioned buckets over a torch.distributed process group (`cluster.weight_sync=broadcast`).

The sender (learner rank 0) and the receivers (every rollout engine, in vLLM's worker processes or in
the rollout actor, and the adversary) live on different sides of the system, so the format and the
send/receive live here, in core. One sync, all collectives rooted at rank 0 of the group:

1. header: int64 [version, manifest bytes]; then the manifest, JSON as uint8 bytes: for every tensor
   its Hugging Face name, dtype, shape, bucket and byte offset, and the bucket sizes.
2. agreement: every receiver checks the manifest against the names, shapes and dtypes it serves
   (`Manifest.check`); one all-reduce (MAX) of the rejections. If anyone rejects, nobody moves a
   byte: the rejecting receiver raises `ManifestMismatch` naming the tensor, the others and the
   sender raise `SyncAborted`, and every engine keeps the weights it had.
3. the buckets, one broadcast each: a flat uint8 buffer of `bucket_bytes` at most (a larger tensor
   gets a bucket of its own), tensors at 64-byte-aligned offsets, unpacked as views.
4. a last all-reduce (MAX) of the receivers' load failures: the sender learns that every receiver
   loaded, or raises.

The group is a standalone one (its own TCPStore, not torch's default group), so it can be built next
to the process groups a receiver already has (vLLM's, FSDP's). gloo on CPU, NCCL on GPU; every
collective gives up after the group's timeout, so a receiver that dies mid-sync cannot hang the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_ALIGN = 64  # bytes: every tensor starts at an offset its dtype can be viewed at


class ManifestMismatch(ValueError):
    """The sender's manifest does not match what this receiver serves (names, shapes or dtypes)."""


class StaleWeights(RuntimeError):
    """A rollout actor or the adversary was asked to serve a weights version it does not hold and got no
    object-store copy to catch up from (a restarted member under `broadcast`): the driver fetches one
    and sends the call again."""


class SyncAborted(RuntimeError):
    """A sync was called off before any weights moved (a receiver rejected the manifest) or failed to load."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in the buckets of a sync."""

    name: str
    """Hugging Face name, as `model.state_dict()` gives it."""
    dtype: str
    """torch dtype name without the `torch.` prefix (float32, bfloat16, ...)."""
    shape: tuple[int, ...]
    """Tensor shape."""
    bucket: int
    """Index of the bucket that carries it."""
    offset: int
    """Byte offset in that bucket (a multiple of 64)."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Manifest:
    """Everything a receiver must know before any bytes move."""

    version: int
    """Weights version the sync carries."""
    entries: tuple[TensorEntry, ...]
    """Every tensor, in send order."""
    bucket_sizes: tuple[int, ...]
    """Bytes of each bucket."""

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        raw = json.loads(data.decode())
        entries = tuple(TensorEntry(e["name"], e["dtype"], tuple(e["shape"]), e["bucket"], e["offset"])
                        for e in raw["entries"])
        return cls(raw["version"], entries, tuple(raw["bucket_sizes"]))

    def check(self, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
        """Raise ManifestMismatch unless the manifest has exactly the names of `expected` (name ->
        (shape, dtype name)), with those shapes and dtypes."""
        got = {e.name: e for e in self.entries}
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        if missing or unexpected:
            raise ManifestMismatch(f"weights version {self.version}: {len(missing)} missing tensor(s) {missing[:5]}, "
                                   f"{len(unexpected)} unexpected {unexpected[:5]}")
        for name, (shape, dtype) in expected.items():
            e = got[name]
            if tuple(e.shape) != tuple(shape) or e.dtype != dtype:
                raise ManifestMismatch(f"weights version {self.version}: {name} is {e.dtype}{list(e.shape)} in the "
                                       f"sync, this receiver serves {dtype}{list(shape)}")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan(meta: Iterable[tuple[str, tuple[int, ...], torch.dtype]], version: int, bucket_bytes: int) -> Manifest:
    """Pack tensors (name, shape, dtype), in order, into buckets of at most `bucket_bytes` each."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    entries, sizes, used = [], [], None
    for name, shape, dtype in meta:
        nbytes = math.prod(shape) * dtype.itemsize
        start = None if used is None else -(-used // _ALIGN) * _ALIGN
        if start is None or start + nbytes > bucket_bytes and used > 0:
            sizes.append(0)
            start = 0
        entries.append(TensorEntry(name, dtype_name(dtype), tuple(int(d) for d in shape), len(sizes) - 1, start))
        used = start + nbytes
        sizes[-1] = used
    return Manifest(version, tuple(entries), tuple(sizes))


def pack(manifest: Manifest, bucket: int, tensors: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The bucket's flat uint8 buffer [bucket_sizes[bucket]] on `device`, from the named tensors."""
    buf = torch.empty(manifest.bucket_sizes[bucket], dtype=torch.uint8, device=device)
    for e in manifest.entries:
        if e.bucket == bucket:
            t = tensors[e.name].detach()
            buf[e.offset:e.offset + e.nbytes].copy_(t.to(device).contiguous().view(-1).view(torch.uint8))
    return buf


def unpack(manifest: Manifest, bucket: int, buf: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The tensors of one bucket, as views of `buf` (a fresh buffer per bucket keeps them valid)."""
    out = []
    for e in manifest.entries:
        if e.bucket == bucket:
            out.append((e.name, buf[e.offset:e.offset + e.nbytes].view(_dtype(e.dtype)).view(e.shape)))
    return out


@dataclass(frozen=True)
class GroupInfo:
    """How to join one weight group: rank 0 (the sender) hosts its TCPStore at host:port."""

    group_id: str
    """Names this membership; a new id means a new group (after a resize, a restart or a failure)."""
    host: str
    """Address of the sender's TCPStore (127.0.0.1 on one machine)."""
    port: int
    """Port of the sender's TCPStore."""
    world_size: int
    """Sender + every receiver process."""
    backend: str = "gloo"
    """gloo (CPU tensors) or nccl (CUDA tensors)."""
    timeout_s: float = 120.0
    """Every collective of the group gives up after this long."""


FINGERPRINT_SAMPLES = 4096
"""Elements of each tensor that enter its fingerprint (evenly strided; all of a smaller tensor)."""


class Fingerprint:
    """An order-independent digest of named tensors: what a receiver loaded, compared with what the
    learner sent. Each tensor contributes its name, dtype, shape and an evenly strided sample of its
    values (so a 7B policy costs milliseconds; any optimizer step changes nearly every element)."""

    def __init__(self) -> None:
        self.parts: dict[str, bytes] = {}

    def update(self, name: str, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::step][:FINGERPRINT_SAMPLES].to(device="cpu", dtype=torch.float32).contiguous()
        h = hashlib.blake2b(f"{name}|{dtype_name(tensor.dtype)}|{tuple(tensor.shape)}".encode(), digest_size=16)
        h.update(sample.numpy().tobytes())
        self.parts[name] = h.digest()

    def hexdigest(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for name in sorted(self.parts):
            h.update(self.parts[name])
        return h.hexdigest()


def fingerprint(named: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """Fingerprint of a state dict (or of (name, tensor) pairs): equal for equal weights, whatever the order."""
    fp = Fingerprint()
    for name, t in (named.items() if isinstance(named, dict) else named):
        fp.update(name, t)
    return fp.hexdigest()


def _listening_socket(host: str, port: int) -> int:
    """A socket listening on host:port only; its file descriptor, owned by the caller from then on."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock.detach()


def tcp_store(host: str, port: int, world_size: int, rank: int, timeout: timedelta) -> dist.TCPStore:
    """A TCPStore whose server (on rank 0) listens on host:port only: the store torch builds by itself
    (and `init_process_group(init_method="tcp://...")`) listens on every interface."""
    listen_fd = _listening_socket(host, port) if rank == 0 else None
    return dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=listen_fd)


def gloo_devices(own_host: str) -> list:
    """This process's gloo devices: one per interface of GLOO_SOCKET_IFNAME when the user set it (hosts
    with several networks), else one bound to `own_host`, this node's address. Never gloo's default
    device, which resolves the hostname (on a host with several interfaces: the wrong address)."""
    names = [n.strip() for n in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if n.strip()]
    if names:
        return [dist.ProcessGroupGloo.create_device(interface=n) for n in names]
    return [dist.ProcessGroupGloo.create_device(hostname=own_host)]


class WeightGroup:
    """A standalone process group of one weight sync membership (see the module docstring).

    own_host: the address of this process's node, which its gloo device binds (Ray's node address on a
    cluster). None: `info.host`, right for rank 0 (the store's host) and on one machine only.
    """

    def __init__(self, info: GroupInfo, rank: int, own_host: str | None = None):
        if not 0 <= rank < info.world_size:
            raise ValueError(f"rank {rank} outside the weight group of {info.world_size}")
        self.info, self.rank = info, rank
        self.own_host = own_host or info.host
        self.last_fingerprint: str | None = None  # of the last version sent or received in full
        timeout = timedelta(seconds=info.timeout_s)
        # rank 0 listens on info.host (its own node's address), the others dial it; never 0.0.0.0
        self.store = tcp_store(info.host, info.port, info.world_size, rank, timeout)
        prefixed = dist.PrefixStore(f"saei-weights/{info.group_id}", self.store)
        if info.backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = gloo_devices(self.own_host)  # each rank on its own node's address
            self.pg = dist.ProcessGroupGloo(prefixed, rank, info.world_size, options)
            self.device = torch.device("cpu")
        elif info.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, info.world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            raise ValueError(f"weight group backend must be gloo or nccl, got {info.backend!r}")

    def broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait()

    def max(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.pg.allreduce([t], opts).wait()
        return int(t.item())

    def close(self) -> None:
        self.pg = None
        self.store = None


def send(group: WeightGroup, named: Iterable[tuple[str, torch.Tensor]], meta: list[tuple[str, tuple[int, ...],
         torch.dtype]], version: int, bucket_bytes: int) -> Manifest:
    """Rank 0: broadcast `named` (streamed in `meta`'s order: a tensor can be made just before its bucket
    leaves) as version `version`. Raises SyncAborted if a receiver rejects the manifest or fails to load."""
    manifest = plan(meta, version, bucket_bytes)
    data = manifest.to_bytes()
    group.broadcast(torch.tensor([version, len(data)], dtype=torch.int64, device=group.device))
    group.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(group.device))
    if group.max(0):
        raise SyncAborted(f"weights version {version}: a receiver rejected the manifest (its own error names "
                          "the tensor); nothing was sent and every engine keeps its weights")
    it = iter(named)
    pending: dict[str, torch.Tensor] = {}
    fp = Fingerprint()
    for b in range(len(manifest.bucket_sizes)):
        names = [e.name for e in manifest.entries if e.bucket == b]
        while not set(names) <= set(pending):
            name, t = next(it)
            fp.update(name, t)
            pending[name] = t
        group.broadcast(pack(manifest, b, {n: pending.pop(n) for n in names}, group.device))
    group.last_fingerprint = fp.hexdigest()
    if group.max(0):
        raise SyncAborted(f"weights version {version}: a receiver failed to load the weights (see its error)")
    return manifest


def receive(group: WeightGroup, expected: dict[str, tuple[tuple[int, ...], str]]) -> tuple[Manifest, Iterator]:
    """A receiver: the manifest (checked against `expected` with the others before anything moves) and an
    iterator over (name, tensor) that receives bucket by bucket as it is consumed.

    The caller loads from the iterator and then calls `finish(group, ok)`. Raises ManifestMismatch
    (this receiver's manifest is wrong) or SyncAborted (another's is), with nothing received.
    """
    header = torch.empty(2, dtype=torch.int64, device=group.device)
    group.broadcast(header)
    version, size = (int(x) for x in header.tolist())
    data = torch.empty(size, dtype=torch.uint8, device=group.device)
    group.broadcast(data)
    manifest = Manifest.from_bytes(data.cpu().numpy().tobytes())
    try:
        manifest.check(expected)
        error = None
    except ManifestMismatch as err:
        error = err
    if group.max(int(error is not None)):
        raise error or SyncAborted(f"weights version {version}: another receiver rejected the manifest; "
                                   "nothing was sent and these weights stay")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        fp = Fingerprint()
        for b, size_b in enumerate(manifest.bucket_sizes):
            buf = torch.empty(size_b, dtype=torch.uint8, device=group.device)
            group.broadcast(buf)
            for name, t in unpack(manifest, b, buf):
                fp.update(name, t)
                yield name, t
        group.last_fingerprint = fp.hexdigest()  # of everything received: what the receiver now serves

    return manifest, tensors()


def finish(group: WeightGroup, ok: bool) -> None:
    """A receiver, after loading: tell the sender whether it did (the last collective of a sync)."""
    group.max(int(not ok))


def join(current: WeightGroup | None, info: GroupInfo, rank: int, own_host: str | None = None) -> WeightGroup:
    """`current` if it is the group `info` names, else a new membership (a collective: every member of
    `info` joins at the same time, which the first sync on a new group id does). `own_host`: this
    node's address (see WeightGroup)."""
    if current is not None and current.info.group_id == info.group_id and current.rank == rank:
        return current
    if current is not None:
        current.close()
    return WeightGroup(info, rank, own_host)


def receive_into(group: WeightGroup, state: dict[str, torch.Tensor]) -> Manifest:
    """A receiver that serves a torch module: copy a sync into `state` (its `state_dict()`, whose tensors
    share the parameters' memory), tensor by tensor as the buckets arrive, then report back.

    Nothing is copied unless the manifest matches `state` (names, shapes, dtypes) on every receiver. A
    sync that breaks off mid-way (the sender died) leaves some tensors new: the caller must not serve
    until a later sync (or the object store) has loaded a whole version.
    """
    expected = {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in state.items()}
    manifest, tensors = receive(group, expected)
    ok = False
    try:
        with torch.no_grad():
            for name, t in tensors:
                state[name].copy_(t)
        ok = True
    finally:
        finish(group, ok)
    return manifest
