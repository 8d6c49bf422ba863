"""What every command-line entry point shares: quiet library logging and one-line user errors.

    cli.run_absl(main)          for absl entry points (train, evaluate, export)
    cli.run_plain(main, argv)   for argparse / hand-parsed ones (plot, toy, one_prompt)

Library logging (Orbax, absl, jax) shows warnings and above unless `--verbosity` (absl; e.g.
`--verbosity=0` for INFO) or `REVAL_VERBOSITY=info` asks for more. `--help` (or `-h`) prints the
usage and exits 0. A `UserError`, a missing file, a permission problem or a read-only or full
filesystem prints `error: <message>` on stderr and exits with status 2, without a traceback; every
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable

from reval_jax.errors import UserError

HELP_FLAGS = ("--help", "-help", "--helpshort", "-helpshort", "--helpfull", "-helpfull", "-?")
USER_ERRORS = (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
USER_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT)  # a read-only or full filesystem


def quiet_logging(level: str | None = None) -> None:
    """Python and absl logging at WARNING (or `level` / $REVAL_VERBOSITY)."""
    name = (level or os.environ.get("REVAL_VERBOSITY") or "warning").upper()
    logging.getLogger().setLevel(name)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(name.lower())


def _is_user_error(e: OSError) -> bool:
    return isinstance(e, USER_ERRORS) or e.errno in USER_ERRNOS


def _report(e: BaseException) -> None:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_absl(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with quiet logging by default and one-line user errors."""
    from absl import app

    def wrapped(argv):
        # absl's --verbosity default is often not the one in effect (an imported library may have
        # set INFO), so the command line decides: no --verbosity / -v given means quiet
        if not any(a.split("=", 1)[0] in ("--verbosity", "-verbosity", "-v", "--v") for a in sys.argv[1:]):
            quiet_logging()
        _reporting_user_errors(main, argv)

    argv = ["--help" if a == "-h" else a for a in sys.argv]
    asked_for_help = any(a.split("=", 1)[0] in HELP_FLAGS for a in argv[1:])
    try:
        app.run(wrapped, argv=argv)
    except SystemExit as e:
        if asked_for_help and e.code == 1:  # absl exits 1 after printing the usage it was asked for
            sys.exit(0)
        raise


def run_plain(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """`main(argv)` (default: sys.argv[1:]) with quiet logging and one-line user errors."""
    quiet_logging()
    _reporting_user_errors(main, sys.argv[1:] if argv is None else argv)


def _reporting_user_errors(main: Callable[[list[str]], None], argv: list[str]) -> None:
    """main(argv); a user error (UserError, a missing file, a read-only disk) prints one line and
    exits non-zero, anything else keeps its traceback."""
    try:
        main(argv)
    except OSError as e:
        if not _is_user_error(e):
            raise
        _report(e)
    except UserError as e:
        _report(e)
