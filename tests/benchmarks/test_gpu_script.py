"""The GPU benchmark only ever runs inside a short, scarce device lease: a script broken by a change elsewhere would
waste it. So it is run here, on the CPU and tiny, to check it still runs end to end and prints its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_train_throughput.py"


@pytest.mark.slow  # a process of its own that imports Lightning and trains
def test_gpu_benchmark_runs_on_a_cpu_and_prints_its_rates(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path), "--n", "256", "--model", "baseline-cnn", "--batch-size", "64", "--steps", "2"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["patches"] == 256
    for key in ("loader_images_per_s", "step_images_per_s", "train_images_per_s", "train_vs_step"):
        assert result[key] > 0, key
