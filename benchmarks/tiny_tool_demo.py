"""The multi-turn demo measured: ReVal against GRPO on configs/tiny_tool.py, accuracy and tool use over rounds.

Each run is the real command (`python -m reval_jax.train --config=configs/tiny_tool.py`, its own
process) with `--config.algorithm` reval or grpo (each with its registered defaults: ReVal K = 2
updates per round, GRPO K = 1) and `--config.seed`, for the same number of generation rounds.
From each run's metrics.jsonl, per round: the accuracy of the round's episodes (temperature 1,
fresh prompts), calculator calls per episode (env_tool_calls / episodes: the rounds' metrics sum the
calls, they do not count the episodes with at least one) and policy turns per episode. After
each run its last checkpoint is exported and sampled through the engine with the calculator
(``toy_tool.episode_rates``: the ops3 eval split, 128 problems x 2 samples) for the final success
and *tool-use rate* (fraction of episodes with >= 1 call), next to the base model's.

    python benchmarks/tiny_tool_demo.py                                   # 2 x 3 runs; figures in docs/tiny_tool.md
    python benchmarks/tiny_tool_demo.py --seeds=0 --rounds=4 --out=/tmp/tt   # a quick look

Writes `--out`/tiny_tool_runs.json (every run: its per-round series and final rates) and
`--out`/tiny_tool_curves.png; run directories go under --work, and finished runs there are reused.
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

ALGORITHMS = ("reval", "grpo")
EVAL_PROBLEMS, EVAL_SAMPLES = 128, 2


def train(workdir: Path, algorithm: str, seed: int, rounds: int) -> float:
    """One run of the real command (skipped when `workdir` holds a finished one); its wall seconds."""
    return run_command(workdir, ["--config=configs/tiny_tool.py", f"--config.algorithm={algorithm}",
                                 f"--config.seed={seed}", f"--config.num_iterations={rounds}",
                                 f"--config.checkpoint.every={rounds}"])


def series(workdir: Path) -> dict[str, list[float]]:
    """Per round: accuracy, calls and turns per episode, seconds."""
    from configs import tiny_tool

    cfg = tiny_tool.get_config()
    episodes = cfg.data.prompts_per_iteration * cfg.sampling.num_samples
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    trains = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    return {"iteration": [r["iteration"] for r in trains], "accuracy": [r["accuracy"] for r in trains],
            "calls_per_episode": [r["env_tool_calls"] / episodes for r in trains],
            "turns_mean": [r["env_turns_mean"] for r in trains], "iteration_s": [r["iteration_s"] for r in trains]}


def final_rates(model_dir: str, seed: int) -> dict[str, float]:
    """Success and tool use of a Hugging Face directory on the ops3 eval split (module docstring)."""
    import dataclasses

    import reval_jax
    from reval_jax.experiments import toy, toy_tool

    model, tokenizer = reval_jax.load_hf(model_dir)
    problems = toy.make_problems(toy_tool.difficulty_levels()["ops3"], EVAL_PROBLEMS, seed=toy.eval_seed(0))
    return dataclasses.asdict(toy_tool.episode_rates(model, tokenizer, problems, num_samples=EVAL_SAMPLES,
                                                     seed=seed, max_new_tokens=64))


def exported(workdir: Path) -> str:
    from reval_jax.run.export import export

    out = workdir / "hf"
    if not (out / "config.json").exists():
        export(str(workdir / "checkpoints"), str(out))
    return str(out)


def plot(runs: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("accuracy", "accuracy of the round's episodes", base["success"]),
              ("calls_per_episode", "calculator calls per episode", base["calls"]))
    for ax, (key, title, start) in zip(axes, panels, strict=True):
        for algorithm, color in zip(ALGORITHMS, ("tab:blue", "tab:orange"), strict=False):
            mine = [r for r in runs if r["algorithm"] == algorithm]
            for r in mine:
                ax.plot(r["iteration"], r[key], color=color, alpha=0.25, lw=0.8)
            ax.plot(*mean_curve(mine, "iteration", key), color=color, lw=2, label=f"{algorithm} (mean of {len(mine)})")
        ax.axhline(start, color="gray", ls="--", lw=1, label="base model (eval split)")
        ax.set_title(title)
        ax.set_xlabel("generation round")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=0, help="generation rounds per run; 0: the config's")
    parser.add_argument("--out", default=str(REPO / "docs"))
    parser.add_argument("--work", default="/tmp/reval_tiny_tool_runs")
    args = parser.parse_args(argv)
    from configs import tiny_tool

    rounds = args.rounds or tiny_tool.get_config().num_iterations
    base = final_rates(tiny_tool.ASSETS, seed=0)
    print("base model:", base, flush=True)
    runs = []
    for seed in map(int, args.seeds.split(",")):
        for algorithm in ALGORITHMS:
            workdir = Path(args.work) / f"{algorithm}_s{seed}_r{rounds}"
            wall = train(workdir, algorithm, seed, rounds)
            run = {"algorithm": algorithm, "seed": seed, "rounds": rounds, "wall_s": round(wall, 1),
                   **series(workdir), "final": final_rates(exported(workdir), seed=0)}
            runs.append(run)
            print(f"{algorithm} seed {seed}: {wall:.0f}s, accuracy first/last 5 rounds "
                  f"{statistics.fmean(run['accuracy'][:5]):.3f} / {statistics.fmean(run['accuracy'][-5:]):.3f}, "
                  f"final {run['final']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiny_tool_runs.json").write_text(json.dumps({"base": base, "eval": {
        "split": "ops3_eval", "problems": EVAL_PROBLEMS, "samples": EVAL_SAMPLES}, "runs": runs}, indent=1) + "\n")
    plot(runs, base, out / "tiny_tool_curves.png")
    print("wrote", out / "tiny_tool_runs.json", out / "tiny_tool_curves.png")


if __name__ == "__main__":
    main()
