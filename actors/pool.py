"""RolloutPool: K rollout actors (actors.rollout.RolloutActor) behind one queue.

The pool spreads requests over its actors in tasks of a few requests, keeps each actor busy with up to
two tasks in flight, and hands results back per request as tasks finish (`submit` + `poll`), or all at
once in request order (`generate`). Every request carries its own seed, so a task that dies with its
actor is sent again, to any live actor, and gives the very same samples: none is lost and none is
duplicated. An actor that Ray restarts catches up with the current weights before it serves again
(every call names the weights version it needs), and every answer's weights fingerprint is checked
against the learner's for its version (`expect`). The actors spread over the nodes that fit
(`cluster.rollout_*`); one that Ray must restart where no node has room is waited for up to
`cluster.placement_timeout_s` (actors.placement), then the pool raises PlacementTimeout naming the resources.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.placement import PlacementWatch
from actors.rollout import RolloutActor, RolloutRequest
from core.batch import Sample
from core.config import Config, SamplingConfig
from core.members import RestartCounter, check_served
from core.node_cache import PolicyFolder
from core.resources import PlacementTimeout, actor_options, describe, role_resources, unplaced_message
from core.weights import StaleWeights

__all__ = ["RolloutPool", "RolloutRequest", "RolloutStats"]

log = logging.getLogger(__name__)

_DIED = (ActorDiedError, ActorUnavailableError, RayActorError)


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

    def add(self, other: RolloutStats) -> None:
        """Add `other`'s counts to these."""
        self.prompt_tokens += other.prompt_tokens
        self.generated_tokens += other.generated_tokens
        self.seconds += other.seconds
        self.samples += other.samples
        self.restarts += other.restarts
        self.resent += other.resent
        self.weights_checked += other.weights_checked
        self.engine_seconds.extend(other.engine_seconds)


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

    def __init__(self, model_path: str | PolicyFolder, cfg: Config, num_actors: int | None = None):
        # a PolicyFolder travels as it is (each actor gets the folder on its node); a path as a str
        self.model_path = model_path if isinstance(model_path, PolicyFolder) else str(model_path)
        self.cfg = cfg
        self.actors: list = []
        self.failures: dict[int, int] = {}  # actor slot -> deaths of the actor now in it
        self.epochs: dict[int, int] = {}  # actor slot -> deaths ever seen in it
        self.weights_ref: ray.ObjectRef | None = None
        self.version = 0  # of the weights the actors must serve (0: the folder's)
        self.fingerprints: dict[int, str] = {}  # version -> the learner's fingerprint of what it sent
        self.restarts = RestartCounter()  # slots: actor indices
        self.queue: deque[_Task] = deque()
        self.inflight: dict[ray.ObjectRef, tuple[int, _Task]] = {}
        self.done: list[tuple[int, list[Sample]]] = []
        self.next_ticket = 0
        self.stats = RolloutStats()
        # under broadcast: makes an object-store copy of the current weights for an actor that must catch up
        self.weights_provider: Callable[[], ray.ObjectRef] | None = None
        self.tag = uuid.uuid4().hex[:8]
        self.created = 0
        self.watch = PlacementWatch("rollout", "rollout actor", cfg.cluster)  # bounds every wait on an actor
        wanted = cfg.cluster.rollout_workers if num_actors is None else num_actors
        if self.resize(wanted) < 1:
            raise PlacementTimeout(unplaced_message("rollout actor", wanted, wanted, cfg.cluster, "rollout",
                                                    ray.available_resources()))

    # ---- membership ------------------------------------------------------------------------------
    def actor_resources(self) -> dict[str, float]:
        """What Ray must find free on one node for each rollout actor."""
        return role_resources(self.cfg.cluster, "rollout")

    def _new_actor(self):
        c = self.cfg.cluster
        # named (rollout-<pool>-<n>): the dashboard and `ray list actors` show which is which, and ops
        # tooling can reach one by name (`ray.get_actor(name, namespace)`)
        self.created += 1
        # SPREAD: over the nodes that fit (cluster.rollout_resources / accelerator type), one engine's
        # node dying costs one actor; no node affinity, so Ray restarts a dead one on any surviving node
        return RolloutActor.options(name=f"rollout-{self.tag}-{self.created}", scheduling_strategy="SPREAD",
                                    **actor_options(c, "rollout"), max_restarts=c.max_restarts,
                                    max_task_retries=0).remote(self.model_path, self.cfg)

    def resize(self, k: int) -> int:
        """Grow or shrink to k actors (between steps: nothing may be in flight); returns the size reached.

        New actors get the current weights. One that is not up within `cluster.placement_timeout_s`
        (no node has room for it, or its engine does not start) is killed, with a message naming the
        resources it asked for, and the pool goes on with the actors it has.
        """
        if k < 1:
            raise ValueError(f"a rollout pool needs at least one actor, got {k}")
        if self.inflight or self.queue:
            raise RuntimeError("resize the rollout pool between steps, not while requests are in flight")
        while len(self.actors) > k:
            ray.kill(self.actors.pop())
            self.restarts.forget(len(self.actors))
        fresh = self._start(k - len(self.actors))
        self.actors.extend(fresh)
        if fresh and self.weights_ref is not None:
            ray.get([a.load_weights.remote(self.weights_ref, self.version) for a in fresh])
        self.failures = {i: self.failures.get(i, 0) for i in range(len(self.actors))}
        self.epochs = {i: self.epochs.get(i, 0) for i in range(len(self.actors))}
        return len(self.actors)

    def _start(self, n: int) -> list:
        """Start n actors and wait for them (up to cluster.placement_timeout_s); returns those that came up."""
        if n <= 0:
            return []
        timeout = float(self.cfg.cluster.placement_timeout_s)
        every = min(30.0, max(1.0, timeout / 10))  # progress lines while waiting
        starting = {a.ready.remote(): a for a in (self._new_actor() for _ in range(n))}
        up: list = []
        t0 = time.monotonic()
        while starting:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                break
            ready, _ = ray.wait(list(starting), num_returns=len(starting), timeout=min(every, left))
            for ref in ready:
                ray.get(ref)  # an actor whose __init__ failed raises here, as before
                up.append(starting.pop(ref))
            if starting:
                log.info("rollout pool: waiting for %d of %d new rollout actor(s) (%s each) for %.0f of %.0f s",
                         len(starting), n, describe(self.actor_resources()), time.monotonic() - t0, timeout)
        for actor in starting.values():
            ray.kill(actor)  # it must not take a node's room later, outside the pool
        if starting:
            avail = ray.available_resources()
            free = {k: avail.get(k, 0.0) for k in self.actor_resources()}
            log.error("rollout pool: %d new rollout actor(s) not up after %.0f s (cluster.placement_timeout_s); "
                      "each needs %s on one node, the cluster has %s free. Add nodes with that room or lower "
                      "cluster.rollout_cpus / rollout_gpus / rollout_resources; the pool goes on with %d actor(s)",
                      len(starting), timeout, describe(self.actor_resources()), describe(free),
                      len(self.actors) + len(up))
        return up

    @property
    def size(self) -> int:
        return len(self.actors)

    def load_weights(self, weights: dict[str, torch.Tensor] | ray.ObjectRef) -> None:
        """New policy weights on every actor (one object-store copy, each actor reads it)."""
        if self.inflight or self.queue:
            raise RuntimeError("load weights between steps, not while requests are in flight")
        self.weights_ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        self.version += 1
        refs = [a.load_weights.remote(self.weights_ref, self.version) for a in self.actors]
        self.watch.wait(refs, self.actors, num_returns=len(refs))  # a restarted actor may wait for a node
        for i, ref in enumerate(refs):
            try:
                ray.get(ref)
            except _DIED as err:
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

    def expect(self, version: int, fingerprint: str | None) -> None:
        """The learner's fingerprint of `version`: every later answer served at that version is checked
        (the pool's and, through `check_served(..., pool.fingerprints)`, the adversary's)."""
        if fingerprint is not None:
            # calls name the current version only: older fingerprints can never be asked for again
            self.fingerprints = {v: f for v, f in self.fingerprints.items() if v > version}
            self.fingerprints[version] = fingerprint

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

    def abort(self) -> int:
        """Drop every queued and in-flight task and every result not yet polled (a step given up on, an
        answer that failed its check); returns the requests dropped. Their tickets never come back from
        `poll`; the actors stay, and the next `submit` starts clean. Tasks an actor has not started are
        cancelled; one it is running finishes there and its answer is ignored."""
        dropped = self.pending + len(self.done)
        for ref in self.inflight:
            ray.cancel(ref)  # actor tasks: a queued one is dropped, a running one is not interrupted
        self.queue.clear()
        self.inflight.clear()
        self.done.clear()
        return dropped

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
            ready = self.watch.wait(list(self.inflight), self.actors, timeout=timeout)
            ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0) if ready else ([], [])
            for ref in ready:
                slot, task = self.inflight.pop(ref)
                try:
                    samples, counts = ray.get(ref)
                except _DIED as err:
                    self._actor_failed(slot, task, err)
                    continue
                except StaleWeights:  # a restarted actor under broadcast: send again with a copy to load
                    log.warning("rollout actor %d lacks weights version %d; it catches up from the object store",
                                slot, self.version)
                    self.catch_up_ref()
                    self.queue.appendleft(task)
                    continue
                self.stats.weights_checked += check_served(f"rollout actor {slot}", counts.get("version"),
                                                           counts.get("weights"), self.fingerprints)
                self.stats.restarts += self.restarts.seen(slot, counts.get("pid"))
                self.stats.prompt_tokens += counts["prompt_tokens"]
                self.stats.generated_tokens += counts["generated_tokens"]
                self.stats.engine_seconds.append(counts["seconds"])
                self.stats.samples += sum(len(s) for s in samples)
                self.done.extend(zip(task.tickets, samples))
            self._dispatch()
        out, self.done = self.done, []
        return out

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
            self.restarts.forget(slot)

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
        self.stats.add(call)
        return out, call  # type: ignore[return-value]

    def take_stats(self) -> RolloutStats:
        """The counts since the last call (the step pipeline reads them once per step)."""
        out, self.stats = self.stats, RolloutStats()
        return out

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
