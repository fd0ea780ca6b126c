"""CPU threads of evaluate and pretrain-mini: the cores free now (torch's thread per core spin-waits against other
busy processes: builtin:mini's step ran 4-20x slower with 2 threads than with 1 on 2 busy cores)."""

import os

import pytest
import torch

from lora_diffusion import cli


@pytest.fixture
def machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_machine(cores, load):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))

    return set_machine


@pytest.mark.parametrize("cores, load, threads", [(2, 0.1, 2), (2, 0.6, 1), (2, 3.7, 1), (16, 4.2, 12),
                                                  (16, 40.0, 1), (8, 0.0, 8)])
def test_the_default_is_the_cores_not_busy(machine, cores, load, threads):
    machine(cores, load)
    assert cli.cpu_threads() == threads


def test_a_flag_or_omp_num_threads_wins(machine, monkeypatch, capsys):
    machine(2, 3.7)
    assert cli.cpu_threads(2) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cli.cpu_threads() is None  # torch already follows it
    monkeypatch.delenv("OMP_NUM_THREADS")
    before = torch.get_num_threads()
    try:
        assert cli.set_cpu_threads(None, "evaluate") == 1
        assert "evaluate: 1 CPU thread(s): the machine is busy (load 3.7); --threads N to choose" in \
            capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", ["evaluate", "pretrain-mini"])
def test_threads_below_one_are_refused(command, capsys):
    assert cli.main([command, "--threads", "0"]) == 2
    assert "--threads 0: expected an integer >= 1" in capsys.readouterr().err
