#!/usr/bin/env bash
# The checks only a CUDA GPU can make, as one command for a lent GPU machine whose python3 holds torch and which can
# fetch nothing: tests/test_gpu.py, then benchmarks/speed.py's GPU table (fp16) at batch 256 and at batch 1.
#
#   make gpu-kit                      # here, once: Fashion-MNIST and timm's wheel into .gpu/ (git ignores it)
#   bash benchmarks/gpu_check.sh DIR  # there, with .gpu carried: logs, env.txt and speed.jsonl land in DIR
#
# DIR defaults to $OUT, else reports/gpu. MIN_TIME (default 5) sets the seconds of timed rounds per comparison.
# Exit status 0 when the tests pass and every speed row was measured.
set -uo pipefail
out=${1:-${OUT:-reports/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENBENCH_FMNIST_DIR=${TOKENBENCH_FMNIST_DIR:-$PWD/.gpu/fashion-mnist}
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then  # the suite's timm, over whatever timm that machine holds
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tokenbench-site .gpu/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/tokenbench-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))" \
  2>&1 | tee "$out/env.txt" || exit 1
status=0
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log" || status=1
speed() {  # speed.py WHICH BATCH, rows appended to DIR/speed.jsonl
  python3 benchmarks/speed.py "$1" --device cuda --precision fp16 --batch "$2" --min-time "${MIN_TIME:-5}" \
    --report "$out/speed.jsonl" 2>&1 | tee -a "$out/speed.log" || status=1
}
speed all 256
speed tome 1  # LTMP's rows at batch 256 already hold its batch-1 timings
speed pm 1
exit $status
