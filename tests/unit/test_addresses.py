"""Each learner rank's gloo device on its own node's address (learner.worker.bind_gloo), and its threads
from the cores of the node it runs on."""

from __future__ import annotations

import os

import pytest

from core.config import load_config
from learner.worker import bind_gloo, interface_of, learner_threads


def test_the_interface_of_an_address_this_host_has_and_of_one_it_lacks():
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("192.0.2.123") is None  # TEST-NET-1: on no interface here


def test_bind_gloo_names_the_interface_of_the_nodes_address(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert bind_gloo("127.0.0.1") == "lo" and os.environ["GLOO_SOCKET_IFNAME"] == "lo"


@pytest.mark.parametrize("env, host", [("eth9", "127.0.0.1"), (None, "192.0.2.123"), (None, None)])
def test_bind_gloo_leaves_a_users_interface_and_an_unknown_address_alone(monkeypatch, env, host):
    if env is None:
        monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    else:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", env)
    assert bind_gloo(host) is None
    assert os.environ.get("GLOO_SOCKET_IFNAME") == env


def test_learner_threads_share_this_nodes_cores_among_the_ranks_on_it():
    cores = len(os.sched_getaffinity(0))
    cfg = load_config(overrides=["learner.num_workers=4"])
    assert learner_threads(cfg, ranks_here=1) == cores
    assert learner_threads(cfg) == max(1, cores // 4)  # no count given: every rank on one node
    assert learner_threads(load_config(overrides=["cluster.learner_threads=3"]), ranks_here=1) == 3
