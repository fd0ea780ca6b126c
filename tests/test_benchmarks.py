"""The benchmarks still run: each one's --quick mode (the tiny model, seconds) prints its table and writes JSON.
No figure is asserted here: speed and memory are measured by the benchmarks themselves (docs/performance.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["bench_train_step", "bench_end_to_end", "bench_lora_overhead", "bench_layer",
                                  "bench_data", "bench_quality", "bench_sdxl_memory", "bench_end_to_end --family sdxl"])
def test_quick_mode_runs_and_writes_json(tmp_path, name):
    name, *flags = name.split()
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--json", str(out),
                             *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and json.loads(out.read_text())
    assert result.stdout.strip()
