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
        for k, v in record.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "iteration":
                self.tb.add_scalar(tensorboard_tag(f"{kind}/{k}"), v, iteration)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in record.items() if isinstance(v, int | float)},
                           step=int(iteration))
        shown = [f"{k}={_fmt(record[k])}" for k in echo if k in record]
        print(f"[{kind} {iteration:>5}] " + " ".join(shown), file=self.stream, flush=True)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics file; is {workdir} a reval_jax workdir?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(workdir: str | os.PathLike, iteration: int) -> int:
    """Drops records past `iteration` (written after the checkpoint a run resumes from), so that a
    resumed run's metrics file equals an uninterrupted one's. Returns how many were dropped."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["iteration"] <= iteration]
    path.write_text("".join(line + "\n" for line in keep))
    return len(lines) - len(keep)
