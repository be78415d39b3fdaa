#!/usr/bin/env bash
# The gpu tier on the offline GPU host, after the kit of ../shared/gpu is installed in /tmp/site
# (its three commands). Wheels the host may lack (pytest, pyarrow, psutil; Python 3.12) come in the
# ignored folder .gpuextra (`pip download --only-binary=:all: --python-version 3.12 --platform
# manylinux_2_28_x86_64 --no-deps -d .gpuextra pytest pluggy iniconfig pytest-timeout pyarrow psutil`).
# Usage: bash tests/gpu/run_on_gpu_host.sh [pytest args]; writes $OUT/gpu-tests.log when $OUT is set.
set -uo pipefail
test -d /tmp/site/vllm || { echo "no kit in /tmp/site: run the kit's commands 1-3 first"; exit 3; }
export PYTHONPATH=/tmp/site:/tmp/extra:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 TVM_FFI_DISABLE_TORCH_C_DLPACK=1 HF_HUB_OFFLINE=1
want=""
for pair in pytest:pytest pluggy:pluggy iniconfig:iniconfig pytest_timeout:pytest-timeout pyarrow:pyarrow psutil:psutil; do
  python3 -c "import ${pair%%:*}" 2>/dev/null || want="$want ${pair##*:}"
done
if [ -n "$want" ]; then
  echo "installing from .gpuextra:$want"
  python3 -m pip install -q --no-index --no-deps --find-links .gpuextra --target /tmp/extra $want || exit 4
fi
python3 -c "import torch, transformers, vllm, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'gpus', torch.cuda.device_count())"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
log=${OUT:-/tmp}/gpu-tests.log
python3 -m pytest -q -p no:cacheprovider -o addopts="" -ra --durations=15 tests/gpu "$@" > "$log" 2>&1
rc=$?
grep -E "passed|failed|error|PASSED|FAILED|ERROR|SKIPPED|^E " "$log" | tail -60
echo "pytest rc=$rc (full log: $log)"
exit $rc
