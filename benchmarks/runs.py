"""What the benchmarks that compare training runs share: one run of the real command, reused when
finished, and the mean curve of several seeds.

    wall_s = run_command(workdir, ["--config=configs/tiny.py", "--config.seed=1", ...])
    xs, mean = mean_curve(runs, "iteration", "accuracy")
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_command(workdir: Path, flags: list[str]) -> float:
    """`python -m reval_jax.train --workdir=workdir *flags` in its own process, output in
    `workdir`.log; skipped when `workdir` holds a finished run (done.json). Its wall seconds."""
    done = workdir / "done.json"
    if done.exists():
        return json.loads(done.read_text())["wall_s"]
    args = [sys.executable, "-m", "reval_jax.train", f"--workdir={workdir}", *flags]
    workdir.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(workdir.with_suffix(".log"), "w") as out:
        rc = subprocess.run(args, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"run failed ({rc}): {' '.join(args)}\n{workdir.with_suffix('.log').read_text()[-3000:]}")
    wall = time.time() - start
    done.write_text(json.dumps({"wall_s": wall}))
    return wall


def mean_curve(runs: list[dict], x: str, y: str) -> tuple[list, list[float]]:
    """(x values, the mean over `runs` of series `y`), over the rounds every run has."""
    n = min(len(r[y]) for r in runs)
    return runs[0][x][:n], [statistics.fmean(r[y][i] for r in runs) for i in range(n)]


def save_figure(fig, path: Path) -> None:
    """The figure written to `path` (PNG, 110 dpi) and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
