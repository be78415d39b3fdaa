"""core.members: the weights a member holds, the driver's check of an answer, restart counting."""

import pytest
import torch

from core.members import HeldWeights, RestartCounter, check_served
from core.weights import StaleWeights, fingerprint


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}


def test_held_weights_load_receive_and_catch_up():
    held, loaded = HeldWeights("adversary"), []
    assert (held.version, held.fingerprint) == (0, None)  # the folder's weights
    assert not held.must_load(0, have_copy=False) and not held.must_load(None, have_copy=False)
    with pytest.raises(StaleWeights, match="adversary holds weights version 0, the call needs 2"):
        held.must_load(2, have_copy=False)
    assert held.must_load(2, have_copy=True)
    held.load(loaded.append, _state(1), 2)
    assert len(loaded) == 1 and torch.equal(loaded[0]["a"], _state(1)["a"])
    assert (held.version, held.fingerprint) == (2, fingerprint(_state(1)))

    def broken(_weights):
        raise RuntimeError("engine gone")

    with pytest.raises(RuntimeError, match="engine gone"):
        held.load(broken, _state(2), 3)
    assert (held.version, held.fingerprint) == (-1, None)  # unknown: the next call must load again
    assert held.must_load(3, have_copy=True)

    held.receive(lambda: (4, "abc"), 4)
    assert (held.version, held.fingerprint) == (4, "abc")
    with pytest.raises(RuntimeError, match="the weight group sent version 5, the driver announced 6"):
        held.receive(lambda: (5, "def"), 6)
    assert held.version == -1


def test_check_served_checks_only_what_the_learner_reported():
    fp = fingerprint(_state(1))
    assert check_served("adversary", 3, fp, {3: fp})
    assert not check_served("adversary", 3, fp, {2: fp})  # the learner reported none for version 3
    assert not check_served("adversary", 3, None, {3: fp})  # the folder's weights: no fingerprint
    assert not check_served("adversary", None, fp, {3: fp})
    with pytest.raises(RuntimeError, match=r"rollout actor 1 served weights version 3 with fingerprint \w+, the learner"):
        check_served("rollout actor 1", 3, fingerprint(_state(2)), {3: fp})


def test_restart_counter_counts_new_processes_per_slot_once():
    c = RestartCounter()
    assert [c.seen(0, 10), c.seen(1, 20), c.seen(0, 10.0), c.seen(0, None)] == [False, False, False, False]
    assert c.seen(0, 11)  # a new process in slot 0: a restart
    assert not c.seen(0, 10)  # a late answer of the old process is not a second restart
    assert not c.seen(0, 11)
    assert c.seen("adversary", 5) is False and c.seen("adversary", 6) is True
    assert c.restarts == 2
    c.forget(1)  # slot 1 holds a replacement actor: its first process is no restart
    assert not c.seen(1, 21) and c.restarts == 2
