"""The two-node cluster is two hosts in all but hardware: own addresses, no shared disk, no shared
loopback, token auth, code only through runtime_env, storage only through the S3 server in A.

These share one cluster (the session fixture `two_nodes`) and are quick; none of them kills a node.
"""

from __future__ import annotations

import json
import secrets
import time

import pytest

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


def test_each_node_has_its_own_address(two_nodes):
    body = """
def here():
    return ray.util.get_node_ip_address()
nodes = {n["NodeManagerAddress"]: sorted(k for k in n["Resources"] if k in ("head", "worker"))
         for n in ray.nodes() if n["Alive"]}
result = {"nodes": nodes, "head": on("head", here), "worker": on("worker", here)}
"""
    seen = two_nodes.py_in_a(body)
    assert seen["nodes"] == {two_nodes.ip_a: ["head"], two_nodes.ip_b: ["worker"]}
    assert seen["head"] == two_nodes.ip_a
    assert seen["worker"] == two_nodes.ip_b


def test_worker_cannot_read_the_drivers_files(two_nodes, tmp_path):
    marker = tmp_path / "written_by_driver.txt"
    marker.write_text("only on the driver's host")
    readme = str(two_nodes.repo / "README.md")
    seen = two_nodes.probe_paths([str(marker), readme])
    assert seen["head"] == {str(marker): "ok", readme: "ok"}  # the control: the path is right
    assert seen["worker"] == {str(marker): "FileNotFoundError", readme: "FileNotFoundError"}


def test_project_code_is_not_on_the_worker_without_runtime_env(two_nodes):
    body = """
def import_core():
    try:
        import core.config
        return "ok"
    except Exception as e:
        return type(e).__name__
result = {role: on(role, import_core) for role in ("head", "worker")}
"""
    seen = two_nodes.py_in_a(body)
    assert seen["head"] == "ok"  # the editable install, pointing into the checkout
    assert seen["worker"] == "ModuleNotFoundError", seen  # the checkout is hidden on B


def test_worker_cannot_bind_the_heads_address(two_nodes):
    body = """
import socket
def bind(host):
    s = socket.socket()
    try:
        s.bind((host, 0))
        return "ok"
    except OSError as e:
        return e.strerror
    finally:
        s.close()
result = {"b_on_a": on("worker", bind, IP_A), "b_on_b": on("worker", bind, IP_B),
          "a_on_a": on("head", bind, IP_A)}
"""
    seen = two_nodes.py_in_a(body, IP_A=two_nodes.ip_a, IP_B=two_nodes.ip_b)
    assert seen["b_on_a"] == "Cannot assign requested address"
    assert seen["b_on_b"] == "ok" and seen["a_on_a"] == "ok"


CONNECT = """\
import os, ray
try:
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="ERROR")
    print("CONNECTED", int(ray.cluster_resources().get("worker", 0)))
except Exception as e:
    cause = f"{e} <- {e.__cause__}" if e.__cause__ else str(e)
    print("REFUSED", type(e).__name__, cause.replace(chr(10), " "))
"""


@pytest.mark.parametrize("auth", ["token", "no_token", "wrong_token"])
def test_a_driver_needs_the_token(two_nodes, tmp_path, auth):
    home = tmp_path / "home"  # an empty home: no ~/.ray/auth_token to fall back on
    home.mkdir()
    env = two_nodes.driver_env(HOME=str(home), RAY_gcs_server_port_wait_time_s="2")  # 2 tries, not 20
    if auth == "no_token":
        del env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN_PATH"]
    elif auth == "wrong_token":
        wrong = tmp_path / "wrong_token"
        wrong.write_text(secrets.token_hex(32))
        env["RAY_AUTH_TOKEN_PATH"] = str(wrong)
    t0 = time.monotonic()
    proc = two_nodes.run_in_a([str(two_nodes.venv / "bin/python"), "-c", CONNECT], env=env, timeout=240)
    print(f"\n{auth}: {proc.stdout.strip()[:200]} ({time.monotonic() - t0:.1f} s)")
    if auth == "token":
        assert "CONNECTED 1" in proc.stdout, proc.stdout + proc.stderr
    else:
        # refused by the cluster's authentication, not unreachable
        assert "REFUSED" in proc.stdout and "InvalidAuthToken" in proc.stdout, proc.stdout + proc.stderr


JOB_ENTRYPOINT = """\
import json, ray
ray.init()
@ray.remote(num_cpus=0, resources={"worker": 1}, max_retries=0)
def where():
    import core.config
    return {"ip": ray.util.get_node_ip_address(), "core": core.config.__file__}
print("JOBRESULT " + json.dumps(ray.get(where.remote(), timeout=120)))
"""


def test_job_code_reaches_the_worker_only_through_runtime_env(two_nodes):
    excludes = {"excludes": [".venv", ".git", "runs", ".gpukit", ".gpuextra"]}
    cmd = [str(two_nodes.venv / "bin/ray"), "job", "submit", "--address", two_nodes.dashboard_url,
           "--working-dir", str(two_nodes.repo), "--runtime-env-json", json.dumps(excludes),
           "--", "python", "-c", JOB_ENTRYPOINT]  # the CLI quotes each word of the entrypoint
    env = two_nodes.driver_env(RAY_ADDRESS=two_nodes.dashboard_url)
    deadline = time.monotonic() + 120
    while True:  # the head's job agent can take tens of seconds to come up on a loaded machine
        t0 = time.monotonic()
        proc = two_nodes.run_in_a(cmd, env=env, timeout=300)
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    print(f"\nray job submit: {time.monotonic() - t0:.1f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("JOBRESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(lines[-1][len("JOBRESULT "):])
    assert seen["ip"] == two_nodes.ip_b
    assert "runtime_resources" in seen["core"] and not seen["core"].startswith(str(two_nodes.repo)), seen


def test_worker_reads_and_writes_s3_on_the_head(two_nodes):
    # AWS_* go to the task through runtime_env env_vars, for this test only: runtime_env values are shown
    # on the dashboard, so a real job passes credentials another way.
    body = """
def roundtrip(bucket, key, text):
    import os, pyarrow.fs as pafs
    scheme, host = os.environ["AWS_ENDPOINT_URL"].split("://")
    fs = pafs.S3FileSystem(scheme=scheme, endpoint_override=host)
    with fs.open_output_stream(f"{bucket}/{key}") as f:
        f.write(text.encode())
    with fs.open_input_stream(f"{bucket}/{key}") as f:
        return {"ip": ray.util.get_node_ip_address(), "endpoint": host, "back": f.read().decode()}
aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
seen = on("worker", roundtrip, BUCKET, "from_b.txt", TEXT, runtime_env={"env_vars": aws})
import pyarrow.fs as pafs
scheme, host = os.environ["AWS_ENDPOINT_URL"].split("://")
with pafs.S3FileSystem(scheme=scheme, endpoint_override=host).open_input_stream(f"{BUCKET}/from_b.txt") as f:
    seen["driver_reads"] = f.read().decode()
result = seen
"""
    text = f"written on B {secrets.token_hex(4)}"
    seen = two_nodes.py_in_a(body, BUCKET=two_nodes.bucket, TEXT=text)
    assert seen["ip"] == two_nodes.ip_b
    assert seen["endpoint"].startswith(two_nodes.ip_a + ":")
    assert seen["back"] == text and seen["driver_reads"] == text
