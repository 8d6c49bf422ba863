"""Curves of one or several runs, as PNG files, so that runs (GRPO vs ReVal, say) compare at a glance.

    python -m reval_jax.plot WORKDIR [WORKDIR ...] [--out=DIR]

Writes `reward.png` (train accuracy: the mean raw 0/1 reward of each round's rollouts),
`eval.png` (avg@k), `kl.png` (Σ_t [log π_θ − log π_ref] over each sampled response, averaged) and
`length.png` (mean response length) into `--out` (default: the first workdir).

The transformed reward is not plotted: a centered reward (r − group mean) averages to 0 every round.
The KL panel's quantity is the single-sample estimate of KL(π_θ‖π_ref) on the sampled responses; as
an estimate it can be negative (the policy updated since the rollouts, or the reference was just
reset). GRPO, RLOO and DAPO use no reference policy and log no such curve; the panel says so (the
notes are the algorithms' own plot hints, reval_jax/objective/algorithms.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from reval_jax.errors import UserError
from reval_jax.run.metrics import read_metrics

PANELS = {
    "reward": [("train", "accuracy", "train accuracy (mean raw reward of the rollouts)")],
    "eval": [("eval", "avg@", "evaluation avg@k (mean over benchmarks)")],
    "kl": [("train", "kl_mean", "Σ log π_θ/π_ref over the sampled response\n(KL estimate, can be negative)")],
    "length": [("train", "response_length", "mean response length (tokens)")],
}


def no_curve(key: str, algorithm: str) -> str | None:
    """Why a run of `algorithm` logs no `key` curve (its registry record's plot hints), or None."""
    from reval_jax.objective.algorithms import ALGORITHMS  # here: `plot --help` does not import jax

    record = ALGORITHMS.get(algorithm)
    return None if record is None else record.plot.get(key)


def _algorithm(workdir: Path) -> str:
    config = workdir / "config.json"
    return json.loads(config.read_text()).get("algorithm", "?") if config.exists() else "?"


def _label(workdir: Path) -> str:
    return f"{workdir.name} ({_algorithm(workdir)})"


ZERO_BASED = ("response_length",)  # counts: a y-axis from 0, so that a flat curve looks flat (not zoomed noise)


def y_limits(key: str, ys: list[float]) -> tuple[float, float] | None:
    """The y-range of a panel where matplotlib's own would mislead: from 0 for counts."""
    if key in ZERO_BASED and ys:
        return 0.0, max(1.0, 1.05 * max(ys))
    return None


def _series(records, kind: str, key: str):
    xs, ys = [], []
    for r in records:
        if r["kind"] != kind:
            continue
        name = key if key in r else next((k for k in r if k.startswith(key) and "/" not in k), None)
        if name is not None and isinstance(r[name], int | float):
            xs.append(r["iteration"])
            ys.append(r[name])
    return xs, ys


def plot(workdirs: list[str], out: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(w), read_metrics(w)) for w in workdirs]
    out_dir = Path(out or workdirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel, curves in PANELS.items():
        fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
        drawn = False
        for ax, (kind, key, title) in zip(axes[0], curves, strict=True):
            notes, all_ys = [], []
            for workdir, records in runs:
                xs, ys = _series(records, kind, key)
                all_ys += ys
                if xs:
                    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=_label(workdir))
                    drawn = True
                elif note := no_curve(key, _algorithm(workdir)):  # a missing curve is said, not silent
                    notes.append(f"{_label(workdir)}: {note}")
                    drawn = True
            if notes:
                ax.text(0.02, 0.02, "\n".join(notes), transform=ax.transAxes, fontsize=8, va="bottom",
                        color="0.3")
            if limits := y_limits(key, all_ys):
                ax.set_ylim(*limits)
            ax.set_title(title)
            ax.set_xlabel("generation round (iteration)")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        if drawn:
            fig.tight_layout()
            path = out_dir / f"{panel}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written


USAGE = "usage: python -m reval_jax.plot WORKDIR [WORKDIR ...] [--out=DIR]"


def main(argv: list[str]) -> None:
    out = None
    dirs = []
    for arg in argv:
        if arg in ("-h", "--help", "-help", "--helpfull"):
            print(__doc__.strip() + "\n\n" + USAGE)
            return
        if arg.startswith("--out="):
            out = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise UserError(f"unknown option {arg}; {USAGE}")
        else:
            dirs.append(arg)
    if not dirs:
        raise UserError(f"no workdir given; {USAGE}")
    for path in plot(dirs, out):
        print(path)


if __name__ == "__main__":
    from reval_jax.run import cli

    cli.run_plain(main)
