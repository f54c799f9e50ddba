"""The multi-process test harness: workers forked from the preloaded forkserver see the caller's environment and
working directory at each call, and a worker's failure fails the test with its traceback."""
import os

import pytest

from dist_harness import run_distributed

pytestmark = pytest.mark.multiproc


def _env_and_cwd(rank, world):
    return os.environ.get("HARNESS_PROBE"), os.getcwd(), os.environ["RANK"], os.environ["WORLD_SIZE"]


def _fails(rank, world):
    if rank == 1:
        raise ValueError("rank 1 says no")
    return rank


def test_workers_take_the_callers_environment_and_cwd_at_each_call(monkeypatch, tmp_path):
    assert [r[0] for r in run_distributed(_env_and_cwd, 2)] == [None, None]  # the forkserver is running now
    monkeypatch.setenv("HARNESS_PROBE", "set after the server started")
    monkeypatch.chdir(tmp_path)
    got = run_distributed(_env_and_cwd, 2)
    assert got == [("set after the server started", str(tmp_path), str(r), "2") for r in range(2)]
    with pytest.raises(AssertionError, match=r"(?s)rank 1 .*ValueError: rank 1 says no"):
        run_distributed(_fails, 2)
