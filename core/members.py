"""What the driver and the members that serve the policy (rollout actors, the adversary) agree on.

Each member holds a copy of the policy and answers calls that name the weights version they need.
`HeldWeights` is a member's record of the version and fingerprint it serves (both sides keep it the
same way); `check_served` is the driver's check that an answer came from the weights the learner sent
for its version; `RestartCounter` counts restarts of members from the process ids their answers carry.
Pure: no ray (the Ray shells keep their one `ray.get` of an object-store copy).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

import torch

from core.weights import StaleWeights, fingerprint


class HeldWeights:
    """The weights a member serves: version 0 is its folder's, -1 unknown (a load failed or is under way).

    fingerprint: core.weights.fingerprint of what it loaded or received (None for the folder's weights:
    the learner checks versions >= 1 only).
    """

    def __init__(self, who: str):
        self.who = who  # names the member in errors ("rollout actor", "adversary")
        self.version = 0
        self.fingerprint: str | None = None

    def must_load(self, version: int | None, have_copy: bool) -> bool:
        """Whether a call that needs `version` (None: any) must load it first. A member that lacks it and got
        no object-store copy (a restarted one under `broadcast`) raises StaleWeights: the driver sends one."""
        if version is None or version == self.version:
            return False
        if not have_copy:
            raise StaleWeights(f"{self.who} holds weights version {self.version}, the call needs {version}")
        return True

    def load(self, load: Callable[[dict[str, torch.Tensor]], None], weights: dict[str, torch.Tensor],
             version: int) -> None:
        """`load(weights)` (the member's own loader) and record `version`; unknown (-1) if it raises."""
        self.version, self.fingerprint = -1, None
        load(weights)
        self.version, self.fingerprint = version, fingerprint(weights)

    def receive(self, receive: Callable[[], tuple[int, str | None]], version: int) -> None:
        """`receive()` (a broadcast sync: returns the version that came and its fingerprint) and check that
        it is the `version` the driver announced; unknown (-1) until the whole version is in."""
        self.version, self.fingerprint = -1, None
        got, fp = receive()
        if got != version:
            raise RuntimeError(f"{self.who}: the weight group sent version {got}, the driver announced {version}")
        self.version, self.fingerprint = version, fp


def check_served(who: str, version: int | None, served: str | None, expected: Mapping[int, str]) -> bool:
    """Whether an answer served at weights `version` with fingerprint `served` was checked against the
    learner's fingerprint of that version (`expected`: version -> fingerprint); raises when they differ:
    an answer from other weights than the learner's is a bug, never data. Unchecked (False) when the
    learner reported none for that version or the member knows no fingerprint (its folder's weights)."""
    want = expected.get(version) if version is not None else None
    if want is None or served is None:
        return False
    if served != want:
        raise RuntimeError(f"{who} served weights version {version} with fingerprint {served}, the learner sent {want}")
    return True


class RestartCounter:
    """Restarts of members, seen from the process id each answer carries: a process never seen before in a
    slot, after the first one, is a restart. A set per slot, not the last pid: answers of the old process
    that arrive after the new one's (Ray hands results back in any order) are not counted again."""

    def __init__(self) -> None:
        self.pids: dict[Hashable, set[int]] = {}  # slot -> processes that answered from it
        self.restarts = 0  # restarts seen since construction

    def seen(self, slot: Hashable, pid: int | float | None) -> bool:
        """Record an answer from process `pid` in `slot` (None: unknown, ignored); True when it is a restart."""
        if pid is None:
            return False
        pids = self.pids.setdefault(slot, set())
        new = int(pid) not in pids
        restart = new and bool(pids)
        pids.add(int(pid))
        self.restarts += restart
        return restart

    def forget(self, slot: Hashable) -> None:
        """A slot whose member was replaced or removed: its next process is a first one, not a restart."""
        self.pids.pop(slot, None)
