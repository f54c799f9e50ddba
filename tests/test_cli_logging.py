"""CLI logging on a multi-process launch: rank 0 logs INFO, the other ranks warnings and errors only, each line tagged
with its rank (a 64-GPU job would otherwise print every INFO line 64 times, untagged)."""
import logging

import pytest

from megadistill.cli import configure_logging

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture
def emit(monkeypatch, capsys):
    """configure_logging under a launcher's environment on a bare root logger (put back afterwards); the lines the
    test logger then writes to stderr, without their time stamps."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def run(env, verbose=False):
        root.handlers = []  # here, in the test's call: pytest's own capture handler is added when the call starts
        for k in LAUNCH_VARS:
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        configure_logging(verbose)
        log = logging.getLogger("megadistill.x")
        log.debug("dbg line")
        log.info("info line")
        log.warning("warn line")
        return [ln.split(" ", 1)[1] for ln in capsys.readouterr().err.splitlines() if "megadistill.x" in ln]

    yield run
    root.handlers, _ = saved
    root.setLevel(saved[1])


@pytest.mark.parametrize("env,expected", [
    ({}, ["INFO megadistill.x: info line", "WARNING megadistill.x: warn line"]),  # a plain process: as before
    ({"RANK": "0", "WORLD_SIZE": "4"}, ["[rank 0] INFO megadistill.x: info line",
                                        "[rank 0] WARNING megadistill.x: warn line"]),
    ({"RANK": "3", "WORLD_SIZE": "4"}, ["[rank 3] WARNING megadistill.x: warn line"]),  # torchrun worker
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, ["[rank 2] WARNING megadistill.x: warn line"]),  # srun task
], ids=["single", "torchrun_rank0", "torchrun_rank3", "srun_rank2"])
def test_only_rank_zero_logs_info_and_lines_carry_the_rank(emit, env, expected):
    assert emit(env) == expected


def test_verbose_logs_debug_on_every_rank(emit):
    assert emit({"RANK": "3", "WORLD_SIZE": "4"}, verbose=True)[0] == "[rank 3] DEBUG megadistill.x: dbg line"
