"""Curves of one or several runs, as PNG files, so that runs (GRPO vs ReVal, say) compare at a glance.

    python -m reval_jax.plot WORKDIR [WORKDIR ...] [--out=DIR]

Writes `reward.png` (train accuracy and reward against generation rounds), `eval.png` (avg@k),
`kl.png` (Σ(log π_θ − log π_ref) estimate) and `length.png` (mean response length) into `--out`
(default: the first workdir).
"""

from __future__ import annotations

import json
from pathlib import Path

from reval_jax.errors import UserError
from reval_jax.metrics import read_metrics

PANELS = {
    "reward": [("train", "accuracy", "train accuracy"), ("train", "reward_mean", "reward (transformed)")],
    "eval": [("eval", "avg@", "evaluation avg@k (mean over benchmarks)")],
    "kl": [("train", "kl_mean", "KL estimate Σ(log π_θ − log π_ref)")],
    "length": [("train", "response_length", "mean response length (tokens)")],
}


def _label(workdir: Path) -> str:
    config = workdir / "config.json"
    algorithm = json.loads(config.read_text()).get("algorithm", "?") if config.exists() else "?"
    return f"{workdir.name} ({algorithm})"


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
            for workdir, records in runs:
                xs, ys = _series(records, kind, key)
                if xs:
                    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=_label(workdir))
                    drawn = True
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
    from reval_jax import cli

    cli.run_plain(main)
