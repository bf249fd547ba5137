"""The CPU engine for fp32: every option on the same held-out windows, in one run (ratios to PyTorch eager fp32).

    python benchmarks/cpu_engines.py RUN [--store STORE] [--n 1000] [--calibration 256] [--repeats 3]

Engines: PyTorch eager fp32 channels_last (``Predictor(engine="torch", precision="fp32")``, the path of CPUs
without bf16), ``torch.compile`` of it, onnxruntime fp32 on the project's export (``engine="onnx"``), onnxruntime
int8 (static QDQ quantisation of that export, calibrated on ``--calibration`` of the run's own training patches),
OpenVINO fp32 on the export (``engine="openvino"``, when ``import openvino`` works; ``--openvino-path`` adds a
folder to ``sys.path`` for a copy installed with ``pip install --target``), and PyTorch bf16 autocast (today's path
on CPUs with bf16) for reference. On a CPU with bf16 the fp32 engines are the case of CPUs without it: nothing here
uses bf16 but the reference (OpenVINO is told ``INFERENCE_PRECISION_HINT=f32``).

Per engine: windows/s (the best of ``--repeats`` passes over the first ``--timed`` of the ``--n`` held-out ``test``
patches of the run's ``split.csv``, engines taking turns so that noise from a shared CPU falls on all), the load time
and first pass over all ``--n`` (export, compilation, warm-up), max |p - p_eager| and ROC AUC on the ``--n``.
The candidate for the default is the fastest with max |dp| <= 0.002 and |dAUC| <= 0.001. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histodetect.data.store import Store
from histodetect.device import cpu_has_bf16
from histodetect.infer.engine import OnnxMember, Predictor
from histodetect.infer.onnx_graph import to_onnx
from histodetect.metrics import roc_auc
from histodetect.runs import load_model
from histodetect.runs.layout import read_split

MAX_DP = 0.002
MAX_DAUC = 0.001


def int8_predictor(run: Path, calibration: np.ndarray, batch: int) -> Predictor:
    """onnxruntime on the export quantised to int8 (QDQ, per-channel weights), calibrated on ``calibration``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixels": calibration[i : i + batch]} for i in range(0, len(calibration), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        plain, ready, quantised = (Path(folder) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        plain.write_bytes(to_onnx(load_model(run)[0]))
        quant_pre_process(str(plain), str(ready))
        quantize_static(
            str(ready), str(quantised), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
        predictor = Predictor([plain], batch_size=batch, progress=False)
        predictor.members = [OnnxMember(quantised.read_bytes())]
    return predictor


def compiled_predictor(run: Path, batch: int) -> Predictor:
    """PyTorch eager fp32 channels_last with the network through ``torch.compile`` (compiled on first use)."""
    predictor = Predictor([run], precision="fp32", engine="torch", batch_size=batch, progress=False)
    member = predictor.members[0]
    member.model = torch.compile(member.model)  # type: ignore[attr-defined]
    return predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--store", type=Path, help="default: the store the run records (store.json)")
    parser.add_argument("--n", type=int, default=1000, help="held-out test patches to score")
    parser.add_argument("--calibration", type=int, default=256, help="training patches that calibrate int8")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timed", type=int, default=320, help="of those patches, how many each timed pass scores")
    parser.add_argument("--engines", nargs="+", help="only these (names as in the output)")
    parser.add_argument("--openvino-path", type=Path, help="a folder holding openvino (pip install --target)")
    args = parser.parse_args()
    if args.openvino_path:
        sys.path.append(str(args.openvino_path))
    store = Store(args.store or json.loads((args.run / "store.json").read_text())["path"])
    parts = read_split(args.run, store)
    test, train = parts["test"][: args.n], parts["train"]
    patches, labels = store.read(test), store.labels[test]
    calibration = store.read(np.random.default_rng(0).choice(train, args.calibration, replace=False))

    makers: dict[str, Callable[[], Predictor]] = {
        "torch-eager-fp32": lambda: Predictor([args.run], precision="fp32", engine="torch", batch_size=args.batch),
        "torch-compile-fp32": lambda: compiled_predictor(args.run, args.batch),
        "onnxruntime-fp32": lambda: Predictor([args.run], engine="onnx", batch_size=args.batch),
        "onnxruntime-int8": lambda: int8_predictor(args.run, calibration, args.batch),
        "openvino-fp32": lambda: Predictor([args.run], engine="openvino", batch_size=args.batch),
    }
    if cpu_has_bf16():
        makers["torch-eager-bf16 (reference)"] = lambda: Predictor(
            [args.run], precision="bf16", engine="torch", batch_size=args.batch
        )
    if args.engines:
        makers = {name: make for name, make in makers.items() if name == "torch-eager-fp32" or name in args.engines}
    engines: dict[str, dict[str, Any]] = {}
    predictors: dict[str, Predictor] = {}
    answers: dict[str, np.ndarray] = {}
    for name, make in makers.items():
        started = time.perf_counter()
        try:
            predictor = make()
            predictor.progress = False
            probabilities = predictor.predict(patches)  # also the first call: compilation, warm-up
        except Exception as exc:  # an engine that does not install or convert is reported, not fatal
            engines[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        predictors[name], answers[name] = predictor, probabilities
        engines[name] = {"load_and_first_pass_s": round(time.perf_counter() - started, 2)}
    best = {name: float("inf") for name in predictors}
    timed = patches[: args.timed]
    for _ in range(args.repeats):
        for name, predictor in predictors.items():
            started = time.perf_counter()
            predictor.predict(timed)
            best[name] = min(best[name], time.perf_counter() - started)
    eager = answers["torch-eager-fp32"]
    base_auc = roc_auc(labels, eager)
    for name, p in answers.items():
        dp = float(np.abs(p - eager).max())
        auc = roc_auc(labels, p)
        engines[name].update(
            windows_per_s=round(len(timed) / best[name], 1),
            ratio_to_eager_fp32=round(best["torch-eager-fp32"] / best[name], 2),
            max_abs_dp=float(f"{dp:.3g}"),
            roc_auc=round(auc, 5),
            auc_delta=round(auc - base_auc, 5),
            within_tolerance=dp <= MAX_DP and abs(auc - base_auc) <= MAX_DAUC,
        )
    candidates = [n for n, r in engines.items() if r.get("within_tolerance") and "reference" not in n]
    print(
        json.dumps(
            {
                "cpu": platform.processor() or platform.machine(),
                "cpu_has_bf16": cpu_has_bf16(),
                "torch_threads": torch.get_num_threads(),
                "run": str(args.run),
                "patches": len(patches),
                "timed_patches": len(timed),
                "positives": int(labels.sum()),
                "batch": args.batch,
                "engines": engines,
                "fastest_within_tolerance": max(candidates, key=lambda n: engines[n]["windows_per_s"], default=None),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
