"""A real local Ray cluster on loopback for the tests in this folder (see STACK-NOTES.md)."""

import os

import pytest

# Ray reads this once, at its first import: loopback only for every cluster these tests start
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Token auth off: these tests start a private in-process cluster on loopback and test the actors, not
# the cluster's access control (tests/e2e/test_exposure.py keeps auth on and tests it); with it on, a
# stale ~/.ray/auth_token from another run would decide whether the tests can connect.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
