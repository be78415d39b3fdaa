"""Rollout: an engine plus reward scoring, and the pool of Ray actors that serves the old policy.

`Rollout` is the plain class (engine from actors.engines, chat template, core.rewards); `RolloutActor`
its Ray shell. `RolloutPool` spreads requests over K actors in tasks of a few requests, keeps each
actor busy with up to two tasks in flight, and hands results back per request as tasks finish
(`submit` + `poll`), or all at once in request order (`generate`). Every request carries its own
seed, so a task that dies with its actor is sent again, to any live actor, and gives the very same
samples: none is lost and none is duplicated. An actor that Ray restarts catches up with the current
weights before it serves again (every call names the weights version it needs).
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.engines import EngineDied, GenerationRequest, make_engine
from core.batch import Prompt, Sample
from core.config import Config, SamplingConfig
from core.policy import chat_prompt, load_processor
from core.rewards import score
from core.weights import GroupInfo, StaleWeights, fingerprint

log = logging.getLogger(__name__)


@dataclass
class RolloutRequest:
    """n samples of one prompt, on its clean image or on an adversarial one."""

    prompt: Prompt
    """The prompt (question, answer for the reward, clean image)."""
    n: int
    """Samples wanted."""
    seed: int
    """Sampling seed: the same (seed, prompt, image, weights) gives the same samples on any actor."""
    image: np.ndarray | None = None  # [H, W, 3] uint8, same size as prompt.image
    """The image to condition on (I_adv); None means the prompt's clean image."""
    adversarial: bool = False
    """Marks the samples as adversarial (`Sample.adversarial`)."""


@dataclass
class RolloutStats:
    """Throughput of one call (or the sum over calls)."""

    prompt_tokens: int = 0
    """Prompt tokens of all sequences (image tokens included), counted once per sample."""
    generated_tokens: int = 0
    """Response tokens generated."""
    seconds: float = 0.0
    """Wall time of the call."""
    samples: int = 0
    """Samples returned."""
    restarts: int = 0
    """Actor restarts seen: a new process answering in a slot (whether or not the death cost tasks in
    flight; a restarting actor that refuses a few tasks on its way up is still one restart)."""
    resent: int = 0
    """Tasks sent again because their actor died."""
    weights_checked: int = 0
    """Tasks whose actor's weights fingerprint was checked against the learner's for their version."""
    engine_seconds: list[float] = field(default_factory=list)
    """Engine time of each task (sums over actors can exceed `seconds`)."""

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        return {f"{prefix}prompt_tokens": float(self.prompt_tokens),
                f"{prefix}generated_tokens": float(self.generated_tokens),
                f"{prefix}seconds": self.seconds, f"{prefix}tokens_per_s": self.tokens_per_s,
                f"{prefix}samples": float(self.samples), f"{prefix}restarts": float(self.restarts),
                f"{prefix}resent": float(self.resent),
                f"{prefix}weights_checked": float(self.weights_checked)}


class Rollout:
    """One engine serving the policy, with the chat template and reward scoring around it."""

    def __init__(self, model_path: str, cfg: Config, device: str | None = None):
        if device is None:
            device = "cuda" if cfg.cluster.rollout_gpus > 0 and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(cfg.cluster.rollout_cpus)))  # the cores are shared
        self.cfg = cfg
        self.processor = load_processor(model_path)
        self.engine = make_engine(model_path, cfg, device)
        self.fingerprint: str | None = None  # core.weights fingerprint of the weights loaded since (None: the folder's)

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> tuple[list[list[Sample]], dict]:
        """Samples of every request (n each, in order, rewards scored) and the engine's counts."""
        t0 = time.perf_counter()
        fmt = self.cfg.data.format_prompt
        engine_requests = [
            GenerationRequest(prompt=chat_prompt(self.processor, r.prompt.problem, fmt),
                              image=r.prompt.image if r.image is None else r.image, n=r.n, seed=r.seed)
            for r in requests
        ]
        results = self.engine.generate(engine_requests, sampling)
        out: list[list[Sample]] = []
        generated = 0
        for req, res in zip(requests, results):
            samples = []
            for i, g in enumerate(res):
                s = score(g.text, req.prompt.answer)
                samples.append(Sample(prompt_uid=req.prompt.uid, response_ids=g.response_ids, text=g.text,
                                      finish_reason=g.finish_reason, adversarial=req.adversarial,
                                      logprobs=g.logprobs, reward=s.reward, accuracy=s.accuracy,
                                      format_ok=s.format_ok, index=i))
                generated += int(g.response_ids.numel())
            out.append(samples)
        stats = self.engine.last_stats
        return out, {"prompt_tokens": int(stats.prompt_tokens), "generated_tokens": generated,
                     "seconds": time.perf_counter() - t0, "weights": self.fingerprint}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.fingerprint = None
        self.engine.load_weights(weights)
        self.fingerprint = fingerprint(weights)

    def receive_weights(self, info: GroupInfo, rank: int) -> int:
        self.fingerprint = None
        version = self.engine.receive_weights(info, rank)
        self.fingerprint = self.engine.received_fingerprint
        return version

    @property
    def weight_ranks(self) -> int:
        """Ranks this engine takes in a weight group (its worker processes)."""
        return getattr(self.engine, "ranks", 1)


@ray.remote
class RolloutActor:
    """Ray shell of `Rollout`, plus the version of the weights it serves.

    Ray may restart the actor at any time (its `__init__` then loads the folder's weights again), so
    every call names the weights version it needs and carries a reference to them: a restarted
    actor catches up before it serves, whether or not a task of the pool failed. An engine whose own
    processes died (vLLM's engine core: killed, out of memory) cannot serve again: the actor then
    exits, Ray restarts it with a fresh engine, and the pool sends the lost requests again.
    """

    def __init__(self, model_path: str, cfg: Config):
        self.rollout = Rollout(model_path, cfg)
        self.version = 0  # 0: the weights of model_path

    def ready(self) -> bool:
        return True

    def _catch_up(self, version: int, weights: list[ray.ObjectRef]) -> None:
        if version != self.version:
            if not weights:  # under broadcast the pool holds no object-store copy until someone needs one
                raise StaleWeights(f"rollout actor holds weights version {self.version}, the call needs {version}")
            # the ref comes inside a list so that Ray hands it over unresolved: fetched only when needed
            self.load_weights(ray.get(weights[0]), version)

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig, version: int = 0,
                 weights: list[ray.ObjectRef] | None = None) -> tuple[list[list[Sample]], dict]:
        try:
            self._catch_up(version, weights or [])
            out, counts = self.rollout.generate(requests, sampling)
            return out, {**counts, "version": self.version, "pid": os.getpid()}
        except EngineDied as err:
            _exit_for_restart(err)

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        try:
            self.rollout.load_weights(weights)
        except EngineDied as err:
            _exit_for_restart(err)
        self.version = version

    def receive_weights(self, info: GroupInfo, rank: int, version: int) -> None:
        """Receive `version` from the weight group `info` (cluster.weight_sync=broadcast) from `rank` on."""
        self.version = -1  # until the whole version is in
        try:
            got = self.rollout.receive_weights(info, rank)
        except EngineDied as err:
            _exit_for_restart(err)
        if got != version:
            raise RuntimeError(f"rollout actor: the weight group sent version {got}, the driver announced {version}")
        self.version, self.group_id = version, info.group_id

    def weight_group_id(self) -> str | None:
        """The weight group this actor is a member of (None after a restart)."""
        return getattr(self, "group_id", None)

    def weight_ranks(self) -> int:
        return self.rollout.weight_ranks


def _exit_for_restart(err: EngineDied):
    """End this actor's process: Ray counts it as a crash and restarts the actor (max_restarts)."""
    log.error("%s; exiting so that Ray restarts this rollout actor with a fresh engine", err)
    logging.shutdown()
    os._exit(1)


@dataclass
class _Task:
    tickets: list[int]
    requests: list[RolloutRequest]
    sampling: SamplingConfig
    attempts: int = 0
    epoch: int = 0  # deaths of its actor seen when it was sent: tells one death from the next
    merge: bool = False  # may absorb the merge-tasks queued right behind it when it is sent


class RolloutPool:
    """K rollout actors behind one queue. Not thread-safe: one driver loop owns it."""

    _INFLIGHT = 2  # tasks queued per actor, so it never idles between two of them

    def __init__(self, model_path: str, cfg: Config, num_actors: int | None = None):
        self.model_path = str(model_path)
        self.cfg = cfg
        self.actors: list = []
        self.failures: dict[int, int] = {}  # actor slot -> deaths of the actor now in it
        self.epochs: dict[int, int] = {}  # actor slot -> deaths ever seen in it
        self.weights_ref: ray.ObjectRef | None = None
        self.version = 0  # of the weights the actors must serve (0: the folder's)
        self.fingerprints: dict[int, str] = {}  # version -> the learner's fingerprint of what it sent
        self.pids: dict[int, int] = {}  # actor slot -> the process that last answered from it
        self.queue: deque[_Task] = deque()
        self.inflight: dict[ray.ObjectRef, tuple[int, _Task]] = {}
        self.done: list[tuple[int, list[Sample]]] = []
        self.next_ticket = 0
        self.stats = RolloutStats()
        # under broadcast: makes an object-store copy of the current weights for an actor that must catch up
        self.weights_provider: Callable[[], ray.ObjectRef] | None = None
        self.resize(cfg.cluster.rollout_workers if num_actors is None else num_actors)

    # ---- membership ------------------------------------------------------------------------------
    def _new_actor(self):
        c = self.cfg.cluster
        # named (rollout-<pool>-<n>): the dashboard and `ray list actors` show which is which, and ops
        # tooling can reach one by name (`ray.get_actor(name, namespace)`)
        self.created = getattr(self, "created", 0) + 1
        self.tag = getattr(self, "tag", None) or uuid.uuid4().hex[:8]
        return RolloutActor.options(name=f"rollout-{self.tag}-{self.created}", num_cpus=c.rollout_cpus,
                                    num_gpus=c.rollout_gpus, max_restarts=c.max_restarts,
                                    max_task_retries=0).remote(self.model_path, self.cfg)

    def resize(self, k: int) -> None:
        """Grow or shrink to k actors (between steps: nothing may be in flight); new ones get the weights."""
        if k < 1:
            raise ValueError(f"a rollout pool needs at least one actor, got {k}")
        if self.inflight or self.queue:
            raise RuntimeError("resize the rollout pool between steps, not while requests are in flight")
        while len(self.actors) > k:
            ray.kill(self.actors.pop())
        fresh = []
        while len(self.actors) < k:
            self.actors.append(self._new_actor())
            fresh.append(self.actors[-1])
        ray.get([a.ready.remote() for a in fresh])
        if fresh and self.weights_ref is not None:
            ray.get([a.load_weights.remote(self.weights_ref, self.version) for a in fresh])
        self.failures = {i: self.failures.get(i, 0) for i in range(len(self.actors))}
        self.epochs = {i: self.epochs.get(i, 0) for i in range(len(self.actors))}
        self.pids = {i: p for i, p in self.pids.items() if i < len(self.actors)}

    @property
    def size(self) -> int:
        return len(self.actors)

    def load_weights(self, weights: dict[str, torch.Tensor] | ray.ObjectRef) -> None:
        """New policy weights on every actor (one object-store copy, each actor reads it)."""
        if self.inflight or self.queue:
            raise RuntimeError("load weights between steps, not while requests are in flight")
        self.weights_ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        self.version += 1
        for i, ref in enumerate([a.load_weights.remote(self.weights_ref, self.version) for a in self.actors]):
            try:
                ray.get(ref)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                # restarting: every call names the version it needs, with this copy to catch up from
                log.warning("rollout actor %d died while loading weights (%s); it catches up at its next call",
                            i, type(err).__name__)

    def announce(self, version: int) -> None:
        """Every actor received `version` by broadcast (cluster.weight_sync); no object-store copy exists."""
        if self.inflight or self.queue:
            raise RuntimeError("sync weights between steps, not while requests are in flight")
        self.version, self.weights_ref = version, None

    def catch_up_ref(self) -> ray.ObjectRef:
        """An object-store copy of the weights the actors must serve (made on demand under broadcast)."""
        if self.weights_ref is None:
            if self.weights_provider is None:
                raise RuntimeError(f"no copy of weights version {self.version} to catch up from")
            self.weights_ref = self.weights_provider()
        return self.weights_ref

    # ---- requests --------------------------------------------------------------------------------
    def submit(self, requests: list[RolloutRequest], sampling: SamplingConfig | None = None,
               chunk: int | None = None, merge: bool = False) -> list[int]:
        """Queue requests; returns one ticket per request (results come back from `poll`).

        chunk: requests per task (default: spread over the actors, at most `rollout.max_batch_requests`).
        Smaller tasks stream back sooner; larger ones batch better in the engine.
        merge: when an actor frees up, the merge-tasks waiting in the queue (same sampling) go to it as
        one engine batch, up to `rollout.max_batch_requests` requests: requests that trickle in one by
        one (the adversarial ones of a step) then batch as well as the backlog allows.
        """
        sampling = sampling or self.cfg.rollout.sampling
        if chunk is None:
            chunk = min(self.cfg.rollout.max_batch_requests, max(1, math.ceil(len(requests) / len(self.actors))))
        tickets = list(range(self.next_ticket, self.next_ticket + len(requests)))
        self.next_ticket += len(requests)
        for i in range(0, len(requests), chunk):
            self.queue.append(_Task(tickets[i:i + chunk], requests[i:i + chunk], sampling, merge=merge))
        self._dispatch()
        return tickets

    @property
    def pending(self) -> int:
        """Requests submitted and not yet returned by `poll`."""
        return sum(len(t.tickets) for t in self.queue) + sum(len(t.tickets) for _, t in self.inflight.values())

    def pending_refs(self) -> list[ray.ObjectRef]:
        """The object refs of tasks in flight (to `ray.wait` on together with other work)."""
        return list(self.inflight)

    def _dispatch(self) -> None:
        load = {i: 0 for i in range(len(self.actors))}
        for slot, _ in self.inflight.values():
            load[slot] += 1
        while self.queue:
            slot = min(load, key=load.get)
            if load[slot] >= self._INFLIGHT:
                return
            task = self.queue.popleft()
            while (task.merge and self.queue and self.queue[0].merge and self.queue[0].sampling == task.sampling
                   and len(task.requests) + len(self.queue[0].requests) <= self.cfg.rollout.max_batch_requests):
                nxt = self.queue.popleft()
                task = _Task(task.tickets + nxt.tickets, task.requests + nxt.requests, task.sampling,
                             max(task.attempts, nxt.attempts), merge=True)
            actor = self.actors[slot]
            task.attempts += 1
            task.epoch = self.epochs[slot]
            box = [self.weights_ref] if self.weights_ref is not None else None
            self.inflight[actor.generate.remote(task.requests, task.sampling, self.version, box)] = (slot, task)
            load[slot] += 1

    def poll(self, timeout: float | None = None) -> list[tuple[int, list[Sample]]]:
        """Results that are ready, as (ticket, samples); waits up to `timeout` s for the first one."""
        if self.inflight:
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
            ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0) if ready else ([], [])
            for ref in ready:
                slot, task = self.inflight.pop(ref)
                try:
                    samples, counts = ray.get(ref)
                except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                    self._actor_failed(slot, task, err)
                    continue
                except StaleWeights:  # a restarted actor under broadcast: send again with a copy to load
                    log.warning("rollout actor %d lacks weights version %d; it catches up from the object store",
                                slot, self.version)
                    self.catch_up_ref()
                    self.queue.appendleft(task)
                    continue
                self._check_weights(slot, counts)
                self._seen(slot, counts.get("pid"))
                self.stats.prompt_tokens += counts["prompt_tokens"]
                self.stats.generated_tokens += counts["generated_tokens"]
                self.stats.engine_seconds.append(counts["seconds"])
                self.stats.samples += sum(len(s) for s in samples)
                self.done.extend(zip(task.tickets, samples))
            self._dispatch()
        out, self.done = self.done, []
        return out

    def expect(self, version: int, fingerprint: str | None) -> None:
        """The learner's fingerprint of `version`: every later answer served at that version is checked."""
        if fingerprint is not None:
            self.fingerprints[version] = fingerprint

    def _check_weights(self, slot: int, counts: dict) -> None:
        """A result served by weights other than the learner's for its version is a bug, never data."""
        want = self.fingerprints.get(counts.get("version", -1))
        if want is None or counts.get("weights") is None:
            return
        if counts["weights"] != want:
            raise RuntimeError(f"rollout actor {slot} served weights version {counts['version']} with fingerprint "
                               f"{counts['weights']}, the learner sent {want}")
        self.stats.weights_checked += 1

    def _seen(self, slot: int, pid: int | None) -> None:
        if pid is None:
            return
        if self.pids.get(slot, pid) != pid:
            self.stats.restarts += 1
        self.pids[slot] = pid

    def _actor_failed(self, slot: int, task: _Task, err: Exception) -> None:
        if task.epoch == self.epochs[slot]:  # the first task lost to this death (the others follow)
            self.epochs[slot] += 1
            self.failures[slot] += 1
        self.stats.resent += 1
        if task.attempts > 2 * (self.cfg.cluster.max_restarts + 1) * len(self.actors):
            raise RuntimeError(f"rollout task of {[r.prompt.uid for r in task.requests]} failed "
                               f"{task.attempts} times; last error: {err}") from err
        log.warning("rollout actor %d died (%s); %d request(s) sent again", slot, type(err).__name__,
                    len(task.requests))
        self.queue.appendleft(task)
        if self.failures[slot] > self.cfg.cluster.max_restarts:
            # out of restarts: this actor is gone for good; its other tasks fail and come back here too
            log.error("rollout actor %d is out of restarts; replacing it", slot)
            self.actors[slot] = self._new_actor()
            self.failures[slot] = 0
            self.pids.pop(slot, None)

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig | None = None,
                 chunk: int | None = None) -> tuple[list[list[Sample]], RolloutStats]:
        """All samples of `requests`, in request order, and this call's throughput (pool must be idle)."""
        if self.pending:
            raise RuntimeError("generate() needs an idle pool; use submit/poll alongside other requests")
        t0 = time.perf_counter()
        start = self.take_stats()
        tickets = self.submit(requests, sampling, chunk)
        first = tickets[0] if tickets else 0
        out: list[list[Sample] | None] = [None] * len(requests)
        while self.pending:
            for ticket, samples in self.poll(timeout=None):
                out[ticket - first] = samples
        call = self.take_stats()
        call.seconds = time.perf_counter() - t0
        self.stats = start  # the counts before this call stay for the next take_stats
        self._merge(call)
        return out, call  # type: ignore[return-value]

    def _merge(self, call: RolloutStats) -> None:
        s = self.stats
        s.prompt_tokens += call.prompt_tokens
        s.generated_tokens += call.generated_tokens
        s.seconds += call.seconds
        s.samples += call.samples
        s.restarts += call.restarts
        s.resent += call.resent
        s.weights_checked += call.weights_checked
        s.engine_seconds.extend(call.engine_seconds)

    def take_stats(self) -> RolloutStats:
        """The counts since the last call (the step pipeline reads them once per step)."""
        out, self.stats = self.stats, RolloutStats()
        return out

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
