#!/usr/bin/env bash
# Every GPU check of the project in one device call (DEVELOPERS.md, "GPU checks"), most important first, each
# bounded so the whole fits a 9-minute call. Results land in $OUT (the device tool brings them back).
#   here:        bash benchmarks/gpu_wheels.sh
#   device tool: run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=560)
set -u -o pipefail
OUT=${OUT:-/tmp/histodetect-gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  python3 -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__,
'timm', timm.__version__, torch.cuda.get_device_name(0))"; } 2>&1 | tee "$OUT/machine.txt"

# 1. The number: ResNet50, 96 px, one epoch over 220,025 synthetic patches (target 10,000 images/s).
timeout 200 python3 benchmarks/gpu_train_throughput.py --out /tmp/gb 2>"$OUT/bench.err" | tee "$OUT/bench.json"
# 2. The CUDA paths of the suite: augmentation on the device, every model family training on CUDA in bf16,
#    prediction, export. Failures here are findings, not noise: read them.
timeout 200 python3 -m pytest -q -p no:cacheprovider -x --timeout 120 tests/data/test_augment.py \
    tests/train/test_train.py tests/infer 2>&1 | tee "$OUT/pytest.log" | tail -25
# 3. The same epoch with torch.compile, if time is left.
timeout 120 python3 benchmarks/gpu_train_throughput.py --out /tmp/gb --compile 2>"$OUT/bench_compile.err" \
    | tee "$OUT/bench_compile.json"
tail -3 "$OUT"/*.err
