"""A real S3 server for the tests: moto's server mode on 127.0.0.1 with IAM authentication on, one per
session (the fixtures are re-exported by tests/conftest.py), configured for a test only through the
standard AWS environment variables."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.devices import free_port

S3_BUCKET = "saei-test"
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "SAEI_S3_CONNECT_TIMEOUT_S",
            "SAEI_S3_REQUEST_TIMEOUT_S", "SAEI_S3_MAX_ATTEMPTS")



def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "moto_server exited at start"
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto_server did not listen on {port} within {timeout} s")


def _make_user(endpoint: str) -> tuple[str, str]:
    """An IAM user allowed s3:*, made with the server's 3 unauthenticated actions (boto3 comes with moto)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bootstrap",
                       aws_secret_access_key="bootstrap")
    iam.create_user(UserName="saei")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="saei", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="saei")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """(endpoint, access key, secret key) of a fresh moto server holding bucket S3_BUCKET."""
    import pyarrow.fs as pafs

    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3"))
    try:
        _wait_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        access, secret = _make_user(endpoint)
        # The bucket is made through pyarrow, as an operator's script would.
        pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", access_key=access, secret_key=secret,
                          allow_bucket_creation=True).create_dir(S3_BUCKET)
        yield endpoint, access, secret
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The environment every node would have; no region set (a custom endpoint does not need one)."""
    endpoint, access, secret = s3_server
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    return s3_server
