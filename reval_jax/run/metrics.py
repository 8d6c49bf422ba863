"""Run metrics: one writer for stdout, `metrics.jsonl` in the workdir, TensorBoard event files and,
optionally, Weights & Biases. Each record is flat: {"iteration": i, "kind": "train"|"eval", ...}.
TensorBoard tags are the record's names made legal (`eval/avg@4` -> `eval/avg_at_4`); the JSONL
names are unchanged."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        value = value.item() if np.ndim(value) == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


def show_bars(progress: bool, stream=None) -> bool:
    """Whether tqdm bars are shown: config.progress, on a terminal only (the bars' stream, stderr).
    In a log file a bar is carriage returns without a newline, and the line printed next (`[eval 10]
    avg@4=...`) would continue it."""
    stream = sys.stderr if stream is None else stream
    return progress and hasattr(stream, "isatty") and stream.isatty()


def tensorboard_tag(name: str) -> str:
    """`name` with only the characters TensorBoard accepts (letters, digits, _ - . /)."""
    return re.sub(r"[^-/\w.]", "_", name.replace("@", "_at_"))


class MetricsWriter:
    """Appends records to `workdir/metrics.jsonl` and `workdir/tb/`; prints a short line."""

    def __init__(self, workdir: str | os.PathLike, *, wandb_project: str = "", config: dict | None = None,
                 enabled: bool = True, stream=sys.stdout):
        self.workdir = Path(workdir)
        self.enabled = enabled  # only process 0 writes on multi-host runs
        self.stream = stream
        self.tb = self.wandb = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / "metrics.jsonl"
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(self.workdir / "tb"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb_project is set but wandb is not installed; skipping W&B", file=stream)
            else:
                self.wandb = wandb.init(project=wandb_project, config=config, dir=str(self.workdir))

    def write(self, kind: str, iteration: int, values: dict[str, Any], *, echo: tuple[str, ...] = ()):
        if not self.enabled:
            return
        record = {"kind": kind, "iteration": int(iteration), **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._add_scalars(record)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in record.items() if isinstance(v, int | float)},
                           step=int(iteration))
        shown = [f"{k}={_fmt(record[k])}" for k in echo if k in record]
        print(f"[{kind} {iteration:>5}] " + " ".join(shown), file=self.stream, flush=True)

    def _add_scalars(self, record: dict[str, Any]) -> None:
        for k, v in record.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "iteration":
                self.tb.add_scalar(tensorboard_tag(f"{record['kind']}/{k}"), v, record["iteration"])

    def rewind(self, iteration: int) -> int:
        """On resume from checkpoint `iteration`: drops the records past it from metrics.jsonl and
        rewrites the TensorBoard events from what is kept (old event files are removed, so that no
        step appears twice). Returns how many records were dropped."""
        if not self.enabled:
            return 0
        dropped = truncate_after(self.workdir, iteration, stream=self.stream)
        from tensorboardX import SummaryWriter

        self.tb.close()
        tb_dir = self.workdir / "tb"
        for f in tb_dir.glob("events.out.tfevents.*"):
            f.unlink()
        self.tb = SummaryWriter(str(tb_dir))
        for record in read_metrics(self.workdir, stream=self.stream):
            self._add_scalars(record)
        self.tb.flush()
        return dropped

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _read_records(path: Path, stream) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file. A partial last line (a run killed mid-write) is dropped
    with a warning; a bad line elsewhere is an error naming it."""
    lines = path.read_text().splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON record ({e}): {line[:80]!r}") from e
            print(f"warning: {path}:{number}: dropping a partial last record (the run was stopped "
                  f"while writing it): {line[:80]!r}", file=stream or sys.stderr)
    return out


def read_metrics(workdir: str | os.PathLike, *, stream=None) -> list[dict[str, Any]]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics file; is {workdir} a reval_jax workdir?")
    return _read_records(path, stream)


def truncate_after(workdir: str | os.PathLike, iteration: int, *, stream=None) -> int:
    """Drops records past `iteration` (written after the checkpoint a run resumes from), and a
    partial last line, so that a resumed run's metrics file equals an uninterrupted one's. Returns
    how many records were dropped."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    records = _read_records(path, stream)
    keep = [r for r in records if r["iteration"] <= iteration]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return len(records) - len(keep)
