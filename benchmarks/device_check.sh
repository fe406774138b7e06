#!/usr/bin/env bash
# Issue 13's CUDA checks in one command, for a session lent a GPU machine (the `device` tool):
# the test suite's CUDA tests and the fine-tuning benchmark on the GPU. Neither needs the VGG-16
# weights, the data or opencv-contrib, so one call carries only what the GPU image lacks
# (pycocotools, which `import coseg_cli` needs). The end-to-end `benchmarks/speed.py` does need
# opencv-contrib (cv2.ximgproc for the proposals): its wheel (68–73 MB) is larger than the 64 MiB
# a call may carry, so that run needs the wheel split over two back-to-back calls.
#
#   here:  bash benchmarks/device_check.sh --prepare   # cp312 wheels into .whl/ (git-ignored)
#   there: bash benchmarks/device_check.sh             # run with carry [".whl"]
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl pycocotools==2.0.11
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/coseg-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/coseg-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda available:', torch.cuda.is_available())"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_peaks.py -k cuda || status=1
python3 benchmarks/train_speed.py --device cuda || status=1
exit "$status"
