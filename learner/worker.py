"""One learner rank: the policy under FSDP2, AdamW, and the GRPO update of one step's batch.

`LearnerWorker` is a plain class (learner/group.py runs one per Ray actor, or one in the driver with
`num_workers=0`). Every rank receives the whole `TrainBatch` and takes its own contiguous block of
rows; each rank runs the same number of micro-batches (an empty one becomes a zero-weight forward
of row 0), because every FSDP2 forward and backward is a collective.

Losses are weighted so that the gradient equals the one of a single process over the whole batch:
FSDP2 averages gradients over ranks, so micro-batch m on a rank of W gets weight
`W * tokens_m / tokens_batch` (token-mean) or `W * rows_m / rows_batch` (seq-mean-token-mean).
kl_cov / clip_cov pick their top / random tokens within a micro-batch, as verl does.

Old log-probs are the learner's own: on-policy (the first epoch) they are the detached log-probs of
the very forward that carries the gradient, so they cost nothing; the engine's log-probs are only
compared against them (`rollout/logprob_diff`).

The scored module is learner/scorer.py; checkpoints are learner/checkpoint.py; the weights leaving the
shards (export, broadcast, Hugging Face folder) are learner/weight_export.py.
"""

from __future__ import annotations

import fcntl
import math
import os
import socket
import struct
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from core import weights
from core.batch import TrainBatch
from core.config import Config
from core.devices import free_port, role_device
from core.policy import chat_prompt, encode_groups, load_policy, load_processor, resolve_dtype
from core.weights import GroupInfo, tcp_store
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.grpo import policy_loss
from learner.scorer import Scorer
from learner.weight_export import broadcast_sharded, full_weights

# torch.distributed's timeout for one collective: a rank that waits longer on a peer gives up. The group
# notices a dead rank long before (learner.group names it as soon as Ray reports the death).
GROUP_TIMEOUT = timedelta(minutes=30)


def learner_threads(cfg: Config, ranks_here: int | None = None) -> int:
    """Torch threads of one CPU learner rank (`cluster.learner_threads`; 0: the cores of the node this
    runs on shared among the `ranks_here` ranks on it, None: all `learner.num_workers`). Computed in the
    rank's own process: the driver's node may have other cores."""
    if cfg.cluster.learner_threads > 0:
        return cfg.cluster.learner_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, cfg.learner.num_workers if ranks_here is None else ranks_here))


def interface_of(address: str) -> str | None:
    """The network interface of this host whose IPv4 address is `address` (None: no interface has it
    as its primary address, or it is not IPv4)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:  # SIOCGIFADDR: the interface's (primary) IPv4 address
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None


def bind_gloo(own_host: str | None) -> str | None:
    """Put this process's gloo devices on `own_host` (this node's address) by naming the interface that
    holds it in GLOO_SOCKET_IFNAME: torch.distributed's default group takes no device option, and its
    default device resolves the hostname (on a host with several interfaces: the wrong address). Set for
    the process (every later gloo group agrees); a GLOO_SOCKET_IFNAME of the user's wins. Returns the
    interface, or None (unchanged: no address given, or no interface holds it)."""
    if own_host is None or os.environ.get("GLOO_SOCKET_IFNAME"):
        return None
    iface = interface_of(own_host)
    if iface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = iface
    return iface


def _plan(n_rows: int, rank: int, world: int, micro: int) -> list[list[int]]:
    """Row indices of each of this rank's micro-batches; every rank gets the same number of them."""
    bounds = [n_rows * r // world for r in range(world + 1)]  # contiguous, sizes differ by at most 1
    mine = list(range(bounds[rank], bounds[rank + 1]))
    largest = max(bounds[r + 1] - bounds[r] for r in range(world))
    n_micro = max(1, math.ceil(largest / micro))
    cuts = [len(mine) * m // n_micro for m in range(n_micro + 1)]
    return [mine[cuts[m]:cuts[m + 1]] for m in range(n_micro)]


class LearnerWorker:
    """One rank of the learner (plain class; `learner.group.LearnerActor` is its Ray shell).

    model_path: local Hugging Face folder of the policy. rank / world_size / master_addr /
    master_port: the torch.distributed group (gloo on CPU, NCCL on CUDA); a default group that is
    already initialised is reused (in-process mode). own_host: this rank's node address, which its
    gloo device binds (None: gloo's default). device: `cuda` when a GPU is visible and
    `cluster.learner_gpus > 0`, else `cpu`. threads: torch threads on CPU (None: `learner_threads`).
    """

    def __init__(self, model_path: str, cfg: Config, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int | None = None, device: str | None = None,
                 own_host: str | None = None, threads: int | None = None):
        self.cfg = cfg
        self.lcfg = cfg.learner
        self.model_path = str(model_path)
        if device is None:
            device = role_device(cfg.cluster.learner_gpus)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(threads or learner_threads(cfg))
        else:
            # "cuda" has no index: Ray's CUDA_VISIBLE_DEVICES shows each rank its own GPU as device 0
            self.device = torch.device("cuda", torch.cuda.current_device() if self.device.index is None else self.device.index)
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            # with a GPU present, one group serves both devices: CPU workers (tests, in-process
            # references) and CUDA workers can then share a process
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            # the rendezvous store listens on master_addr only (torch's tcp:// init listens on every interface)
            store = tcp_store(master_addr, master_port or free_port(master_addr), world_size, rank, GROUP_TIMEOUT)
            bind_gloo(own_host)  # each rank's device on its own node's address, not rank 0's
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=GROUP_TIMEOUT)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world != world_size:
            raise RuntimeError(f"a process group of {self.world} ranks exists; this worker wants {world_size}")
        self.mesh = init_device_mesh(self.device.type, (self.world,))
        mp = self.lcfg.mixed_precision
        self.param_dtype = resolve_dtype("auto" if mp == "auto" else mp, self.device)
        self.export_dtype = resolve_dtype(cfg.model.dtype, self.device)

        self.processor = load_processor(self.model_path)
        self.model = self._sharded(trainable=True)
        self.ref = self._sharded(trainable=False) if self.lcfg.kl_coef > 0 else None
        # foreach: with DTensor parameters the default picks the per-tensor loop (measured 3x slower here)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lcfg.lr, betas=tuple(self.lcfg.betas),
                                           weight_decay=self.lcfg.weight_decay, foreach=True)
        warmup = self.lcfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
        self.step = 0
        # clip_cov's random token choice: one stream per rank, saved and restored with the checkpoint
        self.generator = torch.Generator().manual_seed(cfg.run.seed * 1000 + self.rank)

    def _sharded(self, trainable: bool) -> Scorer:
        # fp32 master weights; FSDP2 casts to param_dtype for compute (bf16 on GPU).
        policy = load_policy(self.model_path, dtype=torch.float32, device=self.device,
                             attn_implementation=self.cfg.model.attn_implementation)
        if trainable and self.lcfg.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy.train()  # transformers checkpoints layers only in training mode; Qwen2-VL has no dropout
        policy.requires_grad_(trainable)
        if trainable and self.lcfg.freeze_vision_tower:
            policy.model.visual.requires_grad_(False)
        mp = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        for block in policy.model.visual.blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=mp)
        for layer in policy.model.language_model.layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=mp)
        scorer = Scorer(policy, self.lcfg.head_chunk)
        fully_shard(scorer, mesh=self.mesh, mp_policy=mp)
        return scorer

    # ---- the update --------------------------------------------------------------------------
    def _encode(self, batch: TrainBatch, rows: list[int]) -> tuple[dict, list[int]]:
        """Model inputs of `rows` (sorted so each context's rows are adjacent) and that order."""
        order = sorted(rows, key=lambda i: (int(batch.context[i]), i))
        groups: list[tuple[str, object, list]] = []
        last = None
        for i in order:
            c = int(batch.context[i])
            if c != last:
                text = chat_prompt(self.processor, batch.problems[c], self.cfg.data.format_prompt)
                groups.append((text, batch.images[c], []))
                last = c
            groups[-1][2].append(batch.responses[i])
        encoded, rows_per_image = encode_groups(self.processor, groups, self.cfg.model.shared_prefix)
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        pixel_values, grid = encoded.pop("pixel_values"), encoded.pop("image_grid_thw")
        return dict(inputs=encoded, pixel_values=pixel_values, image_grid_thw=grid, rows_per_image=rows_per_image), order

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One GRPO step on `batch` (`epochs` optimizer steps); returns metrics reduced over ranks."""
        t0 = time.perf_counter()
        lc = self.lcfg
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses (the scheduler moves on after it)
        n = len(batch)
        if n == 0:
            raise ValueError("LearnerWorker.update: empty batch")
        lengths = torch.tensor([r.numel() for r in batch.responses], dtype=torch.float64)
        total_tokens, total_rows = float(lengths.sum()), float(n)
        micro = []
        for rows in _plan(n, self.rank, self.world, lc.micro_batch_size):
            weight = 1.0
            if not rows:  # keeps the collectives in step with the other ranks; contributes nothing
                rows, weight = [0], 0.0
            inputs, order = self._encode(batch, rows)
            share = (float(lengths[order].sum()) / total_tokens if lc.aggregation == "token-mean"
                     else len(order) / total_rows)
            micro.append(dict(inputs=inputs, order=order, weight=weight * share * self.world,
                              count=weight, old=None, ref=None))

        sums: dict[str, float] = {}
        highs: dict[str, float] = {}
        lows: dict[str, float] = {}

        def add(key: str, value: float, weight: float) -> None:
            sums[key] = sums.get(key, 0.0) + value * weight
            sums[key + "#w"] = sums.get(key + "#w", 0.0) + weight

        grad_norms = []
        self.model.train(self.lcfg.gradient_checkpointing)
        for epoch in range(lc.epochs):
            for mb in micro:
                inputs, order = mb["inputs"], mb["order"]
                rmask = inputs["inputs"]["response_mask"]  # [R, T] bool, each response's tokens left-aligned
                logp_flat, ent_flat = self.model(**inputs)
                if epoch == 0:
                    mb["old"] = logp_flat.detach()
                    if self.ref is not None:
                        with torch.no_grad():
                            mb["ref"] = self.ref(**inputs)[0]
                    self._entropy_metrics(batch, order, rmask, ent_flat, mb, add)
                tokens = float(rmask.sum()) * mb["count"]
                logp = self._unflatten(logp_flat, rmask)
                adv = batch.advantages[order].to(self.device)
                loss, m = policy_loss(
                    logp, self._unflatten(mb["old"], rmask), adv, rmask, clip_low=lc.clip_low,
                    clip_high=lc.clip_high, aggregation=lc.aggregation,
                    ref_logprobs=None if mb["ref"] is None else self._unflatten(mb["ref"], rmask),
                    kl_coef=lc.kl_coef, mode=lc.loss_mode, kl_cov_frac=lc.kl_cov_frac, kl_cov_coef=lc.kl_cov_coef,
                    clip_cov_frac=lc.clip_cov_frac, clip_cov_bounds=tuple(lc.clip_cov_bounds),
                    generator=self.generator)
                (loss * mb["weight"]).backward()
                add("actor/loss", float(loss.detach()), tokens)
                for k, v in m.items():
                    if k.endswith("_max"):
                        highs[k] = max(highs.get(k, -math.inf), v) if tokens else highs.get(k, -math.inf)
                    elif k.endswith("_min"):
                        lows[k] = min(lows.get(k, math.inf), v) if tokens else lows.get(k, math.inf)
                    else:
                        add(k, v, tokens)
            grad_norms.append(self._optimizer_step())

        metrics = self._reduce(sums, highs, lows)
        seconds = time.perf_counter() - t0
        metrics.update({
            "actor/grad_norm": sum(grad_norms) / len(grad_norms),
            "actor/lr": lr,
            "learner/tokens": total_tokens,
            "learner/sequences": total_rows,
            "time/learn_s": seconds,
            "learner/tokens_per_s": total_tokens * lc.epochs / seconds,
        })
        return metrics

    @staticmethod
    def _unflatten(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [R, L-1] float32
        return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)

    def _entropy_metrics(self, batch: TrainBatch, order: list[int], rmask: torch.Tensor,
                         ent_flat: torch.Tensor, mb: dict, add) -> None:
        row_of_token = rmask.nonzero()[:, 0]  # [n_tokens] int64, the micro-batch row of each token
        adversarial = (batch.adversarial[order] if batch.adversarial is not None
                       else torch.zeros(len(order), dtype=torch.bool)).to(self.device)[row_of_token]
        ent = ent_flat.double()
        c = mb["count"]  # 0 for a padding micro-batch
        add("entropy/all", float(ent.mean()) if ent.numel() else 0.0, ent.numel() * c)
        for key, sel in (("entropy/clean", ~adversarial), ("entropy/adversarial", adversarial)):
            k = int(sel.sum())
            add(key, float(ent[sel].mean()) if k else 0.0, k * c)
        if batch.engine_logprobs is not None:
            engine = torch.cat([batch.engine_logprobs[i].float() for i in order]).to(self.device)
            diff = (engine - mb["old"]).abs()
            add("rollout/logprob_diff", float(diff.mean()) if diff.numel() else 0.0, diff.numel() * c)

    def _optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.lcfg.grad_clip if self.lcfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norm = float(norm)
        if math.isfinite(norm):
            self.optimizer.step()
        # a non-finite gradient skips the step rather than writing nan into every weight
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return norm

    def _reduce(self, sums: dict[str, float], highs: dict[str, float], lows: dict[str, float]) -> dict[str, float]:
        """Token-weighted means, maxima and minima over all ranks (every rank has the same keys)."""
        keys, hk, lk = sorted(sums), sorted(highs), sorted(lows)
        s = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        h = torch.tensor([highs[k] for k in hk], dtype=torch.float64)
        lo = torch.tensor([lows[k] for k in lk], dtype=torch.float64)
        if self.world > 1:
            dev = self.device if self.device.type == "cuda" else torch.device("cpu")
            s, h, lo = s.to(dev), h.to(dev), lo.to(dev)
            dist.all_reduce(s, op=dist.ReduceOp.SUM)
            if h.numel():
                dist.all_reduce(h, op=dist.ReduceOp.MAX)
            if lo.numel():
                dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            s, h, lo = s.cpu(), h.cpu(), lo.cpu()
        total = dict(zip(keys, s.tolist()))
        out = {k: total[k] / total[k + "#w"] for k in keys if not k.endswith("#w") and total[k + "#w"] > 0}
        out.update({k: v for k, v in zip(hk, h.tolist()) if math.isfinite(v)})
        out.update({k: v for k, v in zip(lk, lo.tolist()) if math.isfinite(v)})
        return out

    # ---- weights and checkpoints (learner/weight_export.py, learner/checkpoint.py) ---------------
    def export_weights(self) -> dict[str, torch.Tensor]:
        """The full state dict (Hugging Face names, `model.dtype` resolved: bf16 on GPU) on rank 0; {} elsewhere.

        A collective: every rank must call it.
        """
        out = full_weights(self.model, self.rank, self.export_dtype)
        if self.rank == 0:
            self.last_fingerprint = weights.fingerprint(out)
        return out

    def weights_fingerprint(self) -> str | None:
        """core.weights fingerprint of the weights last exported or broadcast (rank 0; None elsewhere)."""
        return getattr(self, "last_fingerprint", None)

    def broadcast_weights(self, info: GroupInfo, version: int, bucket_bytes: int) -> float:
        """Send the weights to every receiver of the weight group `info` as `version` (a collective of the
        learner ranks; rank 0 is the group's sender). Returns the bytes sent (rank 0) or 0.
        Streamed from the shards (weight_export.broadcast_sharded)."""
        group = self._weight_group(info) if self.rank == 0 else None
        sent = broadcast_sharded(self.model, self.rank, self.export_dtype, group, version, bucket_bytes)
        if group is not None:
            self.last_fingerprint = group.last_fingerprint
        return sent

    def _weight_group(self, info: GroupInfo) -> weights.WeightGroup:
        """The weight group of `info` (joined once per group id; a new id replaces the old group)."""
        if getattr(self, "_wgroup", None) is None or self._wgroup.info.group_id != info.group_id:
            self._wgroup = weights.WeightGroup(info, rank=0)
        return self._wgroup

    def save(self, path: str, client_state: dict | None = None) -> None:
        """Checkpoint to `path` (a collective; the layout is in learner/checkpoint.py): the sharded model +
        optimizer, a Hugging Face folder, each rank's RNG, step, scheduler and `client_state` (e.g. the
        data cursor)."""
        save_checkpoint(self, path, client_state)

    def load(self, path: str) -> dict:
        """Resume from `save(path)`: model, optimizer, scheduler, step and RNG; returns the client state."""
        self.step, client_state = load_checkpoint(self, path)
        return client_state

    def close(self) -> None:
        """Leave the process group (Ray shells call this before they exit)."""
        if dist.is_initialized():
            dist.destroy_process_group()
