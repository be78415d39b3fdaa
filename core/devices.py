"""Where a role runs: its torch device and a free port on its own address. No ray, no vllm."""

from __future__ import annotations

import socket

import torch


def role_device(gpus: float) -> str:
    """"cuda" when the role asked Ray for GPUs (`cluster.*_gpus` > 0) and this process sees one, else "cpu".

    A role that asked for no GPU stays on the CPU even on a GPU node: Ray did not reserve one for it.
    """
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the OS picks it; a caller binds it soon after, so a race is possible
    but rare). `host` is the address of the node the caller runs on, never 0.0.0.0."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
