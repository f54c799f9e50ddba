"""The CLI's own layer: argument parsing (key=value overrides before or after a verb's options) and logging on a
multi-process launch (rank 0 logs INFO, the other ranks warnings and errors only, each line tagged with its rank: a
64-GPU job would otherwise print every INFO line 64 times, untagged)."""
import logging

import pytest

from megadistill.cli import configure_logging, parse_args


@pytest.mark.parametrize("argv,overrides", [
    (["eval", "runs/t", "--eval-tokens", "256", "data.eval_fraction=0.05"], ["data.eval_fraction=0.05"]),
    (["eval", "runs/t", "data.a=1", "--eval-tokens", "256", "data.b=2"], ["data.a=1", "data.b=2"]),  # in order
    (["eval", "runs/t", "data.a=1"], ["data.a=1"]),
    (["teacher-cache", "runs/t", "--data", "d.yaml", "-o", "c", "--top-k", "8", "model.vocab_size=320"],
     ["model.vocab_size=320"]),
])
def test_overrides_may_follow_the_options(argv, overrides):
    args = parse_args(argv)
    assert args.overrides == overrides
    assert (args.run_dir if argv[0] == "eval" else args.teacher) == "runs/t"


@pytest.mark.parametrize("argv,bad", [
    (["eval", "runs/t", "--eval-tokens", "256", "--bogus"], "--bogus"),  # an unknown option stays an error
    (["eval", "runs/t", "--eval-tokens", "256", "not_an_override"], "not_an_override"),
    (["aggregate", "runs/*", "-o", "t.csv", "data.a=1"], "data.a=1"),  # a verb without overrides
])
def test_other_extra_arguments_are_still_refused(argv, bad, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and f"unrecognized arguments: {bad}" in capsys.readouterr().err


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
