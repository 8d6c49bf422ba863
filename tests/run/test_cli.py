"""The command-line entry points: --help answers with the usage, user errors are one line without a
traceback (exit status 2), bugs keep their traceback."""

import errno
import os
import subprocess
import sys

import pytest
from helpers import HANG_S, REPO_ROOT

from reval_jax.errors import UserError
from reval_jax.run import cli

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=HANG_S)


@pytest.mark.parametrize("module", ["train", "evaluate", "export", "plot", "toy", "one_prompt"])
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


def test_train_user_error_is_one_line():
    proc = _run("reval_jax.run.train", "--config=configs/tiny.py", "--config.model.path=/nope/model",
                "--workdir=/nope/run")
    _one_line_error(proc, "config.model.path", "/nope/model")


def test_export_user_error_is_one_line(tmp_path):
    proc = _run("reval_jax.run.export", f"--checkpoint={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}")
    _one_line_error(proc, "missing", "config.json")


def test_plot_user_error_is_one_line(tmp_path):
    _one_line_error(_run("reval_jax.tools.plot", str(tmp_path)), "no metrics file")
    _one_line_error(_run("reval_jax.tools.plot", "--outt=x", str(tmp_path)), "unknown option --outt=x")


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
