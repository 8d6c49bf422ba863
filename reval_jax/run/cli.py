"""What every command-line entry point shares: quiet library logging and one-line user errors.

    cli.run_absl(main)          for absl entry points (train, evaluate, export)
    cli.run_plain(main, argv)   for argparse / hand-parsed ones (plot, toy, one_prompt)

Library logging (Orbax, absl, jax) shows warnings and above unless `--verbosity` (absl; e.g.
`--verbosity=0` for INFO) or `REVAL_VERBOSITY=info` asks for more. `--help` (or `-h`) prints the
usage and exits 0. A `UserError`, a missing file, a permission problem or a read-only or full
filesystem prints `error: <message>` on stderr and exits with status 2, without a traceback; every
other exception is a bug and keeps its traceback.

`run_absl` parses the flags itself (before `main`), so the command line's own mistakes are one line
too: a config field the run config does not have (`--config.betta=0.1`: "did you mean beta?", nested
fields included), a config file that does not exist (`--config=configs/tny.py`), a value that does
not parse (`--config.beta=abc`) and an unknown flag.
"""

from __future__ import annotations

import difflib
import errno
import logging
import os
import re
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
        app.run(wrapped, argv=argv, flags_parser=parse_flags)
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl's `FLAGS(argv)` (app.run's flags_parser) with the user's mistakes as one line, exit 2: an
    unknown flag or config field, a value that does not parse, a config file that does not load."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:  # an unknown flag, a value of the wrong type, flags out of order
        _report(UserError(_one_line(str(e))))
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config lacks
        _report(UserError(_unknown_field(argv) or _one_line(str(e))))
    except OSError as e:  # ml_collections: a config file that does not load, met while applying overrides
        _report(UserError(_config_file_error(argv) or _one_line(str(e))))
    except SyntaxError as e:  # a config file that is not Python
        _report(UserError(f"{e.filename}:{e.lineno}: {e.msg} (the config file is not valid Python)"))
    # without overrides ml_collections defers a config file's load error to the config's first use
    if message := _config_file_error(argv):
        _report(UserError(message))
    return rest


def _one_line(message: str) -> str:
    """A (possibly multi-line) parse error as one line; an embedded traceback keeps its first and last lines."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = [lines[0], lines[-1]]
    return " ".join(lines)


def _config_flags() -> list:
    """The command's config flags (`config_flags.DEFINE_config_file` / `DEFINE_config_dict`)."""
    from absl import flags
    from ml_collections.config_flags.config_flags import is_config_flag

    return [flag for flag in flags.FLAGS._flags().values() if is_config_flag(flag)]


def _argument(argv: list[str], name: str) -> str | None:
    """The value given to `--name` (`--name=value` or `--name value`; the last one wins)."""
    value = None
    for i, arg in enumerate(argv[1:], start=1):
        flag, eq, rest = arg.partition("=")
        if flag.lstrip("-") == name and flag.startswith("-"):
            value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def _config_file_error(argv: list[str]) -> str | None:
    """Why a config flag's file does not load (absent: the nearest file of its folder), or None."""
    for flag in _config_flags():
        given = _argument(argv, flag.name)
        if given is None:
            continue
        path = given.split(":", 1)[0]
        if not os.path.isfile(path):
            folder, name = os.path.split(path)
            files = os.listdir(folder or ".") if os.path.isdir(folder or ".") else []
            near = difflib.get_close_matches(name, [f for f in files if f.endswith(".py")], n=1)
            hint = f"; did you mean {os.path.join(folder, near[0])}?" if near else ""
            return f"--{flag.name}={given}: no such config file{hint}"
        try:
            hasattr(flag.value, "_reval_probe")  # ml_collections' stand-in for a failed load raises OSError
        except OSError as e:
            return f"--{flag.name}={given}: cannot load the config file ({_one_line(str(e))})"
    return None


def _unknown_field(argv: list[str]) -> str | None:
    """`--config.<path>` naming a field the config does not have, with the nearest field's name."""
    for flag in _config_flags():
        config = _given_config(flag, argv)
        if config is None:
            continue
        for arg in argv[1:]:
            match = re.match(rf"^--?(?:no)?{re.escape(flag.name)}\.([^=]+)", arg)
            if match and (missing := _missing_field(config, match.group(1))):
                near = _nearest(missing, config)
                hint = f"; did you mean {near}?" if near else ""
                return f"{arg}: the {flag.name} has no field {missing}{hint}"
    return None


def _given_config(flag, argv: list[str]):
    """The config a config flag holds before its overrides: its file loaded again, or its inline value."""
    given = _argument(argv, flag.name)
    if given is None:
        return flag.value
    try:
        return flag.parser.parse(given)
    except Exception:  # noqa: BLE001 - a config that does not load has no fields to suggest
        return None


def _fields(config, prefix: str = "") -> list[str]:
    """Every dotted field path of a ConfigDict, nested dicts and their fields included."""
    out = []
    for key in config.keys() if hasattr(config, "keys") else ():
        out.append(prefix + key)
        out += _fields(config[key], f"{prefix}{key}.")
    return out


def _missing_field(config, path: str) -> str | None:
    """The first prefix of `path` that is not a field of `config` (None: every part exists, or the path
    indexes into something that is not a ConfigDict, which ml_collections judges itself)."""
    node, parts = config, path.split(".")
    for i, part in enumerate(parts):
        key = part.split("[", 1)[0]
        if not hasattr(node, "keys"):
            return None
        if key not in node.keys():
            return ".".join(parts[:i] + [key])
        if "[" in part:
            return None
        node = node[key]
    return None


def _nearest(missing: str, config) -> str | None:
    """The field nearest to `missing`, by its last name: a sibling first (`eval.temprature` ->
    `eval.temperature`), then a field anywhere (`temprature` -> `eval.temperature`)."""
    fields = _fields(config)
    parent, _, name = missing.rpartition(".")
    for candidates in ([f for f in fields if f.rpartition(".")[0] == parent], fields):
        by_name = {}
        for field in candidates:
            by_name.setdefault(field.rpartition(".")[2], field)
        if near := difflib.get_close_matches(name, list(by_name), n=1):
            return by_name[near[0]]
    return None
