"""The benchmarks still run: each one's --quick mode (the tiny model, seconds) prints its table and writes JSON.
No figure is asserted here: speed and memory are measured by the benchmarks themselves (docs/performance.md).
No wall-clock limit either (a busy machine is slow, not broken): child_process.run's hour is a safety net for a
hung child, and what a benchmark started is ended with it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from child_process import end_tree, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["bench_train_step", "bench_end_to_end", "bench_lora_overhead", "bench_layer",
                                  "bench_data", "bench_quality", "bench_sdxl_memory", "bench_end_to_end --family sdxl"])
def test_quick_mode_runs_and_writes_json(tmp_path, name):
    name, *flags = name.split()
    out = tmp_path / f"{name}.json"
    # one thread: a smoke test measures nothing, and a thread per core spin-waits on a busy machine (many times slower)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    flags += [] if name == "bench_data" else ["--threads", "1"]
    result = run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--json", str(out), *flags],
                 cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and json.loads(out.read_text())
    assert result.stdout.strip()


def alive(pid) -> bool:
    """Running: a zombie (exited, not yet reaped by whoever adopted it) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, what, limit=600):
    """Poll; the limit is a safety net against a hang, far beyond any slow machine."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {limit} s: {what}")
        time.sleep(0.1)


def benchmark_with_a_child(tmp_path):
    """A benchmark-like parent that starts a child through common.child (as the benchmarks start train_lora.py
    and their workers), the child ignoring SIGTERM so only SIGKILL ends it; returns (parent, the child's pid)."""
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "parent.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
import common
child = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
         "time.sleep(3600)")
with common.child([sys.executable, "-c", child], stdout=-1, text=True) as process:
    process.stdout.readline()
    open({str(pid_file)!r}, "w").write(str(process.pid))
    process.wait()
""")
    parent = subprocess.Popen([sys.executable, str(script)], start_new_session=True, cwd=ROOT)
    wait_until(pid_file.exists, "the benchmark-like parent to start its child")
    return parent, int(pid_file.read_text())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_benchmark_stopped_by_sigterm_ends_its_children(tmp_path):
    parent, child = benchmark_with_a_child(tmp_path)
    assert alive(child) and os.getpgid(child) == child  # its own process group
    os.kill(parent.pid, signal.SIGTERM)  # what a supervisor sends the benchmark alone
    assert parent.wait(600) == 128 + signal.SIGTERM
    wait_until(lambda: not alive(child), "the child to be ended with its benchmark")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_test_that_gives_up_on_a_benchmark_ends_its_whole_tree(tmp_path):
    parent, child = benchmark_with_a_child(tmp_path)
    end_tree(parent, grace=1)  # what child_process.run does on its safety net or an interrupted test
    assert parent.returncode is not None
    wait_until(lambda: not alive(child), "the benchmark's child, in a session of its own, to be ended too")
