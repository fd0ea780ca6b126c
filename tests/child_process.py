"""Running a command from a test (a benchmark, the trainer) without wall-clock failures and without orphans.

    result = run([sys.executable, "benchmarks/bench_layer.py", "--quick"], cwd=ROOT, env=env)

`timeout` is a safety net for a hung child (an hour by default), never a measure: a slow or busy machine does not
reach it. When it is reached, or the test is interrupted, the child's whole tree is ended: its process group and
every group its descendants run in (the benchmarks start their children in sessions of their own), SIGTERM first
so that the child can stop its own children, then SIGKILL."""

import os
import signal
import subprocess
from pathlib import Path

SAFETY_NET_S = 3600


def run(command, *, timeout=SAFETY_NET_S, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True, **kwargs), the child in a session of its own."""
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        end_tree(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux); [] elsewhere."""
    children = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])  # after "pid (comm) state"
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_groups(pids) -> set[int]:
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    return groups - {os.getpgrp()}  # never the test's own group


def end_tree(process: subprocess.Popen, grace: float = 10.0):
    """SIGTERM to the groups of the child and of all its descendants (found before any of them exits: orphans
    lose their parent link), then after `grace` seconds SIGKILL to the same groups."""
    groups = process_groups([process.pid, *descendants(process.pid)])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if sig == signal.SIGTERM:
            try:
                process.communicate(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    process.communicate()
