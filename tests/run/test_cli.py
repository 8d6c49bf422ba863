"""The command-line entry points: --help answers with the usage, user errors are one line without a
traceback (exit status 2), bugs keep their traceback. The mistakes made on the command line itself
(a mistyped config field, a missing config file, a value that does not parse) are caught while the
flags are parsed, before `main` runs; the real commands run as subprocesses (the e2e tier)."""

import errno
import os
import subprocess
import sys

import pytest
from helpers import HANG_S, REPO_ROOT
from ml_collections import config_dict

from reval_jax.errors import UserError
from reval_jax.run import cli

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=HANG_S)


@pytest.mark.e2e
@pytest.mark.parametrize("module", ["train", "evaluate", "export", "plot", "scale", "experiments.toy",
                                    "experiments.one_prompt"])
def test_every_command_answers_help(module):
    proc = _run(f"reval_jax.{module}", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower() or f"python -m reval_jax.{module}" in proc.stdout
    assert "Traceback" not in proc.stderr


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.mark.e2e
def test_train_user_error_is_one_line():
    proc = _run("reval_jax.run.train", "--config=configs/tiny.py", "--config.model.path=/nope/model",
                "--workdir=/nope/run")
    _one_line_error(proc, "config.model.path", "/nope/model")


@pytest.mark.e2e
def test_export_user_error_is_one_line(tmp_path):
    proc = _run("reval_jax.run.export", f"--checkpoint={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}")
    _one_line_error(proc, "missing", "config.json")


@pytest.mark.e2e
def test_plot_user_error_is_one_line(tmp_path):
    _one_line_error(_run("reval_jax.tools.plot", str(tmp_path)), "no metrics file")
    _one_line_error(_run("reval_jax.tools.plot", "--outt=x", str(tmp_path)), "unknown option --outt=x")


COMMAND_LINE_MISTAKES = {
    "mistyped-field": (["--config.betta=0.1"], ["--config.betta=0.1", "no field betta", "did you mean beta?"]),
    "mistyped-nested-field": (["--config.eval.temprature=0"], ["no field eval.temprature",
                                                                 "did you mean eval.temperature?"]),
    "field-in-the-wrong-section": (["--config.temprature=0"], ["did you mean eval.temperature?"]),
    "missing-config-file": (["--config=configs/tny.py"], ["--config=configs/tny.py: no such config file",
                                                          "did you mean configs/tiny.py?"]),
    "missing-config-file-with-overrides": (["--config=configs/tny.py", "--config.beta=1"],
                                           ["no such config file"]),
    "non-numeric-value": (["--config.beta=abc"], ["--config.beta=abc", "could not convert string to float: 'abc'"]),
}


@pytest.mark.e2e
@pytest.mark.parametrize("mistake", COMMAND_LINE_MISTAKES)
def test_train_command_line_mistakes_are_one_line(mistake, tmp_path):
    args, fragments = COMMAND_LINE_MISTAKES[mistake]
    config = [] if any(a.startswith("--config=") for a in args) else ["--config=configs/tiny.py"]
    proc = _run("reval_jax.train", *config, *args, f"--workdir={tmp_path / 'run'}")
    _one_line_error(proc, *fragments)
    assert not (tmp_path / "run").exists()  # refused before main: nothing written


@pytest.mark.e2e
@pytest.mark.parametrize("module", ["evaluate", "export"])
def test_every_absl_command_names_a_mistyped_field(module, tmp_path):
    proc = _run(f"reval_jax.{module}", "--config=configs/tiny.py", "--config.model.attentoin=einsum",
                f"--checkpoint={tmp_path}")
    _one_line_error(proc, "--config.model.attentoin=einsum", "did you mean model.attention?")


@pytest.mark.e2e
def test_a_parquet_file_that_is_not_parquet_is_one_line(tmp_path):
    bad = tmp_path / "problems.parquet"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n')
    proc = _run("reval_jax.evaluate", "--config=configs/tiny.py", f"--config.eval.files=('{bad}',)")
    _one_line_error(proc, f"{bad}: not a readable Parquet file")


def test_nearest_field_looks_at_siblings_first_then_everywhere():
    config = config_dict.ConfigDict({"beta": 0.1, "eval": {"temperature": 1.0, "every": 10},
                                     "model": {"attention": "auto", "dtype": "float32"}})
    assert cli._missing_field(config, "betta") == "betta"
    assert cli._missing_field(config, "eval.temprature") == "eval.temprature"
    assert cli._missing_field(config, "eval.nope.deeper") == "eval.nope"
    assert cli._missing_field(config, "eval.every") is None
    assert cli._nearest("betta", config) == "beta"
    assert cli._nearest("eval.temprature", config) == "eval.temperature"
    assert cli._nearest("temprature", config) == "eval.temperature"
    assert cli._nearest("model.nlayers", config) is None  # nothing near: no wild guess


def test_multi_line_parse_errors_become_one_line():
    embedded = "flag --config=c.py: Error whilst parsing config file:\n\nTraceback (most recent call last):\n" \
               '  File "c.py", line 2\nValueError: bad knob'
    assert cli._one_line(embedded) == "flag --config=c.py: Error whilst parsing config file: ValueError: bad knob"
    assert cli._one_line("Unknown flag 'x'.\n  Did you mean: y ?") == "Unknown flag 'x'. Did you mean: y ?"


def test_user_errors_exit_2_and_bugs_keep_their_traceback(capsys):
    def user_mistake(argv):
        raise UserError(f"config.beta: {argv[0]} must be > 0")

    with pytest.raises(SystemExit) as info:
        cli.run_plain(user_mistake, ["-1"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: config.beta: -1 must be > 0\n"

    def read_only(argv):
        raise OSError(errno.EROFS, "Read-only file system", "runs/x/config.json")

    with pytest.raises(SystemExit):
        cli.run_plain(read_only, [])
    assert capsys.readouterr().err.startswith("error: [Errno 30] Read-only file system")

    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        cli.run_plain(bug, [])
