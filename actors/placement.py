"""Waiting for Ray to place a role's actors, bounded by `cluster.placement_timeout_s`.

A rollout actor or the adversary that dies (its node with it) is restarted by Ray wherever its
resources fit; until some node has room, the restarted actor waits, and so does every call made to it:
without a bound the step would hang. The driver's waits (the pool's `poll` and weight loads, the step's
wait for attacks) therefore block in slices and, between slices, ask Ray (the GCS actor table) which of
the role's actors are not placed yet: it logs what it waits for, and after `cluster.placement_timeout_s`
of waiting it raises `PlacementTimeout` with one line naming the resources. A slow call on a placed
actor is never cut short: only the time an actor spends unplaced counts.
"""

from __future__ import annotations

import logging
import time

import ray

from core.config_schema import ClusterConfig
from core.resources import PlacementTimeout, describe, role_resources, unplaced_message

__all__ = ["PlacementTimeout", "PlacementWatch", "actor_state"]

log = logging.getLogger(__name__)

# Ray's actor states of an actor that has no process yet (waiting for a node, or starting on one).
_UNPLACED = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING")


def actor_state(actor) -> str:
    """Ray's state of `actor` (ALIVE, RESTARTING, DEAD, ...); UNKNOWN when it cannot be read."""
    try:
        # the GCS actor table itself: ray.util.state's get_actor goes through the dashboard, which a
        # cluster may run without
        from ray._private import state

        return state.actors(actor._actor_id.hex()).get("State", "UNKNOWN")
    except Exception:  # noqa: BLE001 - a diagnostic: never the reason a wait fails
        return "UNKNOWN"


class PlacementWatch:
    """The unplaced actors of one role and since when they wait (see the module docstring)."""

    def __init__(self, role: str, what: str, cluster: ClusterConfig):
        self.role, self.what, self.cluster = role, what, cluster  # cluster: read at each check (it may change)
        self.since: dict[str, float] = {}  # actor id -> when it was first seen unplaced
        self.logged = 0.0

    @property
    def every(self) -> float:
        """Seconds between two looks at the actors (and two progress lines) while a wait goes on."""
        return min(30.0, max(0.5, float(self.cluster.placement_timeout_s) / 10))

    def check(self, actors: list) -> None:
        """Look at `actors` (this role's, now): log what is waiting for room; raise PlacementTimeout when
        one has waited longer than cluster.placement_timeout_s."""
        now = time.monotonic()
        waiting = {a._actor_id.hex(): s for a in actors if (s := actor_state(a)) in _UNPLACED}
        self.since = {i: self.since.get(i, now) for i in waiting}
        if not waiting:
            return
        waited, timeout = now - min(self.since.values()), float(self.cluster.placement_timeout_s)
        if waited >= timeout:
            free = ray.available_resources()
            raise PlacementTimeout(unplaced_message(self.what, len(waiting), len(actors), self.cluster, self.role,
                                                    free))
        if now - self.logged >= self.every:
            self.logged = now
            log.info("waiting for room for %d of %d %s(s) (%s each; Ray reports %s) for %.0f of %.0f s "
                     "(cluster.placement_timeout_s)", len(waiting), len(actors), self.what,
                     describe(role_resources(self.cluster, self.role)), ", ".join(sorted(set(waiting.values()))),
                     waited, timeout)

    def wait(self, refs: list, actors: list, num_returns: int = 1, timeout: float | None = None) -> list:
        """`ray.wait(refs, num_returns, timeout)` (returns the ready refs) that looks at `actors` between
        slices: it raises PlacementTimeout instead of blocking on an actor that cannot be placed."""
        if not refs:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            piece = self.every if left is None else min(left, self.every)
            ready, _ = ray.wait(refs, num_returns=min(num_returns, len(refs)), timeout=piece)
            if len(ready) >= min(num_returns, len(refs)) or (left is not None and left <= piece):
                return ready
            self.check(actors)
