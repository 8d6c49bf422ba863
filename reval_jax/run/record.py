"""The run's record of its configs: which starts may go on with which config, and where each start's
config is written.

    check_start(workdir, config_json, allow)   # before anything is built or written: refuses a changed config
    write_start(workdir, config_json, first)   # once the start is known to train (iteration `first` on)

A workdir's `config.json` is the config its first start ran with; it is never rewritten. A later
start compares its config with the run's latest recorded one (the newest `config.start-<i>.json`,
else `config.json`). Equal, or different only in fields that cannot change what the run computes
(`CHANGEABLE`: `num_iterations`, raised to go on, and how the run is displayed, cached and
checkpointed), it goes on; any other difference (the algorithm, β, a path to the model or the data,
a field the record does not hold, at a value other than its default) is refused with a UserError
naming each field, its old and new value and `--config.allow_config_change=True`, which accepts
them. A start that goes on with a
config other than the latest recorded one writes it beside the others as `config.start-<i>.json`,
i the first iteration it trains; a start that trains nothing writes nothing.

A field added to the code after a run was recorded (absent from its record) is no change when this
start gives it its default in configs/base.py: a new field's default keeps what runs did before it
existed, so runs recorded by older code resume without the flag.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import re
from pathlib import Path

from reval_jax.errors import UserError

# fields a start may change without --config.allow_config_change: none changes the trained weights,
# the samples or any metric's value
CHANGEABLE = (
    "num_iterations",  # raised to go on with a finished run
    "progress",  # progress bars
    "compile_cache",  # where compiled programs are cached
    "checkpoint.every", "checkpoint.keep", "checkpoint.async_save",  # when, how many and how checkpoints are written
    "reward.num_workers",  # verifier processes (each answer is scored alike by any of them)
)
IGNORED = ("allow_config_change",)  # the switch itself is not part of what a run computes
FLAG = "--config.allow_config_change=True"
ORIGINAL = "config.json"
_START = re.compile(r"config\.start-(\d+)\.json")
_ABSENT = "(not recorded)"


@dataclasses.dataclass(frozen=True)
class Change:
    """One field whose value differs between the run's record and this start's config."""

    field: str
    old: object
    new: object

    def __str__(self) -> str:
        old = self.old if self.old is _ABSENT else repr(self.old)
        new = self.new if self.new is _ABSENT else repr(self.new)
        return f"{self.field}: {old} -> {new}"


@functools.cache
def base_defaults() -> dict:
    """configs/base.py's config as JSON ({} where the checkout has no configs/ beside the package)."""
    path = Path(__file__).resolve().parents[2] / "configs" / "base.py"
    if not path.exists():
        return {}
    spec = importlib.util.spec_from_file_location("_reval_base_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return json.loads(module.get_config().to_json())


def _same(a, b) -> bool:
    return json.dumps(a, default=str, sort_keys=True) == json.dumps(b, default=str, sort_keys=True)


def changes(old: dict, new: dict, prefix: str = "", defaults: dict | None = None) -> list[Change]:
    """The fields (dotted paths) whose values differ between two JSON configs; a field only one of
    them has counts as changed, except one the old record lacks that the new config sets to its
    default (`defaults`: configs/base.py's config)."""
    defaults = base_defaults() if defaults is None else defaults
    out = []
    for key in sorted(set(old) | set(new)):
        if prefix + key in IGNORED:
            continue
        a, b, d = old.get(key, _ABSENT), new.get(key, _ABSENT), defaults.get(key, _ABSENT)
        if a is _ABSENT and isinstance(b, dict) and isinstance(d, dict):
            a = {}  # a section added since the record: each of its fields against its default
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f"{prefix}{key}.", d if isinstance(d, dict) else {})
        elif a is _ABSENT and d is not _ABSENT and _same(b, d):
            continue  # a field added since the record, at the default that keeps the old behaviour
        elif not _same(a, b):
            out.append(Change(prefix + key, a, b))
    return out


def needs_flag(change: Change) -> bool:
    return change.field not in CHANGEABLE


def latest_record(workdir: Path) -> tuple[Path, dict] | None:
    """(path, config) of the run's latest recorded config, or None for a workdir without one."""
    starts = sorted((int(m.group(1)), p) for p in workdir.glob("config.start-*.json")
                    if (m := _START.fullmatch(p.name)))
    path = starts[-1][1] if starts else workdir / ORIGINAL
    if not path.exists():
        return None
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not a JSON config ({e}); it is the run's record: restore it, or start "
                        "the run in another workdir") from None


def check_start(workdir: Path, config: dict, allow: bool) -> list[Change]:
    """The changes of `config` from the run's latest recorded config (none for a new workdir);
    raises a UserError naming them if one of them needs the flag and `allow` is not set."""
    record = latest_record(workdir)
    if record is None:
        return []
    path, recorded = record
    found = changes(recorded, config)
    refused = [c for c in found if needs_flag(c)]
    if refused and not allow:
        listed = "; ".join(str(c) for c in refused)
        raise UserError(f"{workdir} is a run with another config ({path.name}); this start changes {listed}. "
                        f"Nothing was written. Start it in another workdir, or accept the change with {FLAG} "
                        f"(the run's configs are kept: this one is recorded beside them as "
                        "config.start-<first iteration>.json)")
    return found


def write_start(workdir: Path, config: dict, first: int) -> Path | None:
    """Records the config of a start that trains from iteration `first`: `config.json` for a new run,
    `config.start-<first>.json` beside it when the config differs from the latest recorded one;
    returns the file written (None: the record already holds this config)."""
    record = latest_record(workdir)
    if record is not None and not changes(record[1], config):
        return None
    path = workdir / (ORIGINAL if record is None else f"config.start-{first}.json")
    path.write_text(json.dumps(config, indent=2))
    return path
