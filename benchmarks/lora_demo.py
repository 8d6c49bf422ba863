"""LoRA ReVal against full ReVal on the demo task (configs/tiny.py), equal rounds, several seeds.

Each run is the real command (`python -m reval_jax.train --config=configs/tiny.py`, its own process)
for the same number of generation rounds: `full` as configured, `lora` with adapters of rank
`--rank` on every projection (α = 2·rank, so scale 2), the base frozen, the reference = the base
with the adapter off, each reference reset (every 8 updates) a merge, and its own learning rate
(`--lora_lr`; adapters usually want a higher rate than full fine-tuning). Per round, from each
run's metrics.jsonl: the accuracy of the round's rollouts (temperature 1, fresh prompts) and, every
`eval.every` rounds, avg@4 on the held-out medium_eval split (64 problems).

    python benchmarks/lora_demo.py                                    # 2 x 3 runs; figures in docs/lora.md
    python benchmarks/lora_demo.py --seeds=0 --rounds=4 --out=/tmp/ld   # a quick look

Writes `--out`/lora_demo_runs.json (every run's series) and `--out`/lora_demo.png; run directories
go under --work, and finished runs there are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.runs import mean_curve, run_command, save_figure  # noqa: E402

VARIANTS = ("full", "lora")
EVAL_KEY = "medium_eval/avg@4"


def flags(variant: str, seed: int, rounds: int, rank: int, lora_lr: float) -> list[str]:
    out = ["--config=configs/tiny.py", f"--config.seed={seed}", f"--config.num_iterations={rounds}",
           f"--config.checkpoint.every={rounds}"]
    if variant == "lora":
        out += [f"--config.lora.rank={rank}", f"--config.lora.alpha={2.0 * rank}",
                f"--config.optimizer.learning_rate={lora_lr}"]
    return out


def series(workdir: Path) -> dict[str, list[float]]:
    """Per round: accuracy, update seconds; per evaluation: the iteration and avg@4."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval" and EVAL_KEY in r]
    return {"iteration": [r["iteration"] for r in trains], "accuracy": [r["accuracy"] for r in trains],
            "update_s": [r["update_s"] for r in trains],
            "eval_iteration": [r["iteration"] for r in evals], "eval": [r[EVAL_KEY] for r in evals]}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, color in zip(VARIANTS, ("tab:blue", "tab:green"), strict=True):
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        for ax, (x, y) in zip(axes, (("iteration", "accuracy"), ("eval_iteration", "eval")), strict=True):
            for r in mine:
                ax.plot(r[x], r[y], color=color, alpha=0.25, lw=0.8)
            ax.plot(*mean_curve(mine, x, y), color=color, lw=2, marker="o" if y == "eval" else None,
                    label=f"{variant} ReVal (mean of {len(mine)})")
    axes[0].set_title("accuracy of the round's rollouts")
    axes[1].set_title("held-out avg@4 (medium_eval, 64 problems)")
    for ax in axes:
        ax.set_xlabel("generation round")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora_lr", type=float, default=5e-3)
    parser.add_argument("--out", default=str(REPO / "docs"))
    parser.add_argument("--work", default="/tmp/reval_lora_demo_runs")
    args = parser.parse_args(argv)
    runs = []
    for seed in map(int, args.seeds.split(",")):
        for variant in VARIANTS:
            workdir = Path(args.work) / f"{variant}_s{seed}_r{args.rounds}"
            wall = run_command(workdir, flags(variant, seed, args.rounds, args.rank, args.lora_lr))
            run = {"variant": variant, "seed": seed, "rounds": args.rounds, "wall_s": round(wall, 1), **series(workdir)}
            runs.append(run)
            print(f"{variant} seed {seed}: {wall:.0f}s, accuracy first/last 5 rounds "
                  f"{statistics.fmean(run['accuracy'][:5]):.3f} / {statistics.fmean(run['accuracy'][-5:]):.3f}, "
                  f"eval {run['eval']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"rank": args.rank, "alpha": 2.0 * args.rank, "lora_lr": args.lora_lr, "config": "configs/tiny.py"}
    (out / "lora_demo_runs.json").write_text(json.dumps({"settings": settings, "runs": runs}, indent=1) + "\n")
    plot(runs, out / "lora_demo.png")
    print("wrote", out / "lora_demo_runs.json", out / "lora_demo.png")


if __name__ == "__main__":
    main()
