"""The one-prompt experiment (paper §3 and §5.2, Figure 3), measured with reval_jax's own training run.

    python -m reval_jax.experiments.one_prompt --out=docs/one_prompt [--seeds=3] [--levels=hard,medium,easy]
        [--updates=1,2,4,8] [--max_rounds=100]

For each difficulty of the tiny arithmetic task (`reval_jax.experiments.toy`), the prompt is chosen the way the
paper chose its three: among `--candidates` problems of the level, the one whose base success rate
(over `--select_samples` samples) is closest to the paper's prompt (0.10 hard, 0.40 medium, 0.68
easy). The embedded tiny model is then trained on that prompt alone with GRPO (fresh rollouts for
every update) and with ReVal doing 1, 2, 4 and 8 updates per generation round (one on the fresh
batch, the rest drawn from the replay buffer of the last `--buffer_rounds` rounds), over several
seeds, with the same learning rate, β and reference reset (every `--reset_every` updates) as
configs/tiny.py. Each run is `reval_jax.run.train.run` with the prompt as its only training and
evaluation problem; after every round the accuracy is measured over `--eval_samples` samples of the
prompt and the run stops at 95%. Reported: generation rounds to 95% (median over seeds), the
speed-up of each ReVal setting over GRPO next to the paper's, JSON files, a markdown table and a
plot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PAPER_SPEEDUP = {"hard": 3.6, "medium": 4.1, "easy": 5.2, "average": 4.3}
PAPER_BASE_SUCCESS = {"hard": 0.10, "medium": 0.40, "easy": 0.68}  # of the paper's three prompts


def choose_prompt(model, tokenizer, level: str, *, candidates: int, samples: int, seed: int,
                  max_new_tokens: int) -> tuple[str, str, float]:
    """The prompt of a level to train on, as the paper chose its prompts by base success rate:
    among ``candidates`` problems of the level (problem seed ``seed``), the one whose success rate
    over ``samples`` samples of the base model is closest to the paper's prompt of that level.
    Returns (problem, answer, measured base success)."""
    from reval_jax.experiments import toy

    problems = toy.make_problems(level, candidates, seed=seed)
    rates = toy.problem_success(model, tokenizer, problems, num_samples=samples, seed=seed,
                                max_new_tokens=max_new_tokens)
    best = int(np.argmin(np.abs(rates - PAPER_BASE_SUCCESS[level])))
    return problems[best][0], problems[best][1], float(rates[best])


def run_config(model_dir: str, prompt_file: str, *, algorithm: str, updates: int, seed: int, args):
    from configs import base

    c = base.get_config()
    c.seed = seed
    c.algorithm = algorithm
    c.model.path = model_dir
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.mesh = (1, 1, 1)
    c.num_iterations = args.max_rounds
    c.data.train_files = (prompt_file,)
    c.data.template = "plain"
    c.data.max_prompt_len = 64
    c.data.prompts_per_iteration = 1
    c.sampling.num_samples = args.samples
    c.sampling.max_new_tokens = args.max_new_tokens
    c.sampling.buckets = (64,)
    c.reward.num_workers = 1
    c.reward.transform = "centered"
    c.beta = args.beta
    c.optimizer.learning_rate = args.learning_rate
    c.reference.reset_every = args.reset_every
    c.replay.updates_per_iteration = updates
    c.replay.capacity = args.samples * args.buffer_rounds
    c.eval.files = (prompt_file,)
    c.eval.every = 1
    c.eval.limit = 0
    c.eval.k = args.eval_samples
    c.eval.stop_at = args.target
    c.checkpoint.every = 10**6  # only at the end: this experiment never resumes
    c.progress = False
    c.chunk = 256
    return c


def rounds_to_target(workdir: Path, target: float, key: str) -> int | None:
    from reval_jax.run.metrics import read_metrics

    for r in read_metrics(workdir):
        if r["kind"] == "eval" and r[key] >= target:
            return r["iteration"]
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/one_prompt")
    p.add_argument("--model", default="", help="HF directory (default: the embedded tiny_arith model)")
    p.add_argument("--levels", default="hard,medium,easy")
    p.add_argument("--updates", default="1,2,4,8", help="ReVal updates per generation round")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--problem_seed", type=int, default=0, help="problem seed of the candidate prompts")
    p.add_argument("--candidates", type=int, default=16, help="candidate prompts per level")
    p.add_argument("--select_samples", type=int, default=128,
                   help="base-model samples per candidate measuring its success rate")
    p.add_argument("--max_rounds", type=int, default=100)
    p.add_argument("--samples", type=int, default=8, help="rollouts per generation round")
    p.add_argument("--eval_samples", type=int, default=128, help="samples measuring the accuracy")
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--reset_every", type=int, default=8, help="reference reset every R updates (as configs/tiny.py)")
    p.add_argument("--buffer_rounds", type=int, default=4, help="replay capacity in rounds")
    p.add_argument("--max_new_tokens", type=int, default=80)
    p.add_argument("--no_grpo", action="store_true", help="skip the GRPO baseline")
    return p


def _run_level(level: str, prompt_file: Path, model_dir: str, settings, args) -> list[dict]:
    """Every (algorithm, updates) setting of one level, `args.seeds` runs each, from scratch: the
    rounds each run took to reach `args.target` (None: never) and its seconds."""
    from reval_jax.run import train

    key = f"avg@{args.eval_samples}"
    results = []
    for algorithm, updates in settings:
        for seed in range(args.seeds):
            name = f"{level}_{algorithm}{updates}_s{seed}"
            workdir = Path(args.out) / "runs" / name
            if workdir.exists():
                import shutil

                shutil.rmtree(workdir)
            start = time.perf_counter()
            config = run_config(model_dir, str(prompt_file), algorithm=algorithm, updates=updates,
                                seed=seed, args=args)
            train.run(config, str(workdir))
            rounds = rounds_to_target(workdir, args.target, key)
            results.append({"level": level, "algorithm": algorithm, "updates": updates, "seed": seed,
                            "rounds": rounds, "seconds": time.perf_counter() - start})
            print(json.dumps(results[-1]), flush=True)
    return results


def main(argv=None):
    args = _parser().parse_args(argv)

    import jax

    from reval_jax.experiments import toy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    from reval_jax.model.hf import load_hf

    model_dir = args.model or str(toy.ASSET_DIR)
    base_model, tokenizer = load_hf(model_dir)
    levels = args.levels.split(",")
    settings = ([] if args.no_grpo else [("grpo", 1)]) + [("reval", int(k)) for k in args.updates.split(",")]
    results = []
    prompts = {}
    for level in levels:
        problem, answer, base = choose_prompt(base_model, tokenizer, level, candidates=args.candidates,
                                              samples=args.select_samples, seed=args.problem_seed,
                                              max_new_tokens=args.max_new_tokens)
        prompts[level] = {"problem": problem, "answer": answer, "base_success": base}
        print(json.dumps({"level": level, **prompts[level]}), flush=True)
        prompt_file = out / f"{level}.jsonl"
        prompt_file.write_text(json.dumps({"id": f"one_prompt-{level}", "problem": problem, "answer": answer,
                                           "source": f"{toy.SOURCE}_{level}"}) + "\n")
        results += _run_level(level, prompt_file, model_dir, settings, args)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "prompts.json").write_text(json.dumps(prompts, indent=2))
    table = summarize(results, levels, settings, args.max_rounds, prompts)
    (out / "table.md").write_text(table)
    print(table)
    plot(results, levels, settings, args.max_rounds, out / "rounds_to_target.png")
    return results


def _median_rounds(results, level, algorithm, updates, cap):
    rounds = [r["rounds"] if r["rounds"] is not None else cap + 1 for r in results
              if r["level"] == level and r["algorithm"] == algorithm and r["updates"] == updates]
    return float(np.median(rounds)) if rounds else float("nan"), sum(r > cap for r in rounds)


def summarize(results, levels, settings, cap, prompts=None) -> str:
    """Markdown table: per level, the median generation rounds to the target of each setting and
    each ReVal setting's speed-up over GRPO, next to the paper's speed-up. A run that never reached
    the target counts as cap + 1 rounds, which makes its median and speed-up bounds (marked >, ≥, ≤);
    the averages are over the levels where both medians reached the target."""
    names = [f"{a} K={u}" if a == "reval" else "GRPO" for a, u in settings]
    head = ("| level (base success) | " + " | ".join(names) + " | paper speed-up |\n|---|"
            + "---|" * (len(settings) + 1) + "\n")
    rows, speedups = [], {}
    for level in levels:
        grpo, grpo_missed = _median_rounds(results, level, "grpo", 1, cap)
        cells = []
        for algorithm, updates in settings:
            med, missed = _median_rounds(results, level, algorithm, updates, cap)
            cell = (f"> {cap}" if med > cap else f"{med:g}") + (f" ({missed} missed)" if missed else "")
            if algorithm == "reval" and np.isfinite(grpo) and med > 0 and grpo > 0 and min(med, grpo) <= cap:
                bound = "≥ " if grpo > cap else "≤ " if med > cap else ""
                if not bound:
                    speedups.setdefault(updates, {})[level] = grpo / med
                cell += f", {bound}{grpo / med:.1f}×"
            cells.append(cell)
        base = f" ({prompts[level]['base_success']:.2f})" if prompts and level in prompts else ""
        rows.append(f"| {level}{base} | " + " | ".join(cells) + f" | {PAPER_SPEEDUP.get(level, float('nan'))}× |")
    text = head + "\n".join(rows) + "\n"
    for updates, by_level in speedups.items():
        text += (f"\nReVal K={updates}: average speed-up over GRPO {np.mean(list(by_level.values())):.2f}× "
                 f"on {', '.join(by_level)} (paper: {PAPER_SPEEDUP['average']}× on hard, medium, easy)")
    return text + "\n"


def plot(results, levels, settings, cap, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for level in levels:
        reval = [(u, _median_rounds(results, level, "reval", u, cap)[0]) for a, u in settings if a == "reval"]
        if reval:
            ax.plot([u for u, _ in reval], [m for _, m in reval], marker="o", label=f"ReVal, {level}")
        grpo, _ = _median_rounds(results, level, "grpo", 1, cap)
        if np.isfinite(grpo):
            ax.axhline(grpo, linestyle="--", alpha=0.5, color=ax.lines[-1].get_color() if ax.lines else None,
                       label=f"GRPO, {level}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("updates per generation round")
    ax.set_ylabel("generation rounds to 95% accuracy (median)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    from reval_jax.run import cli

    cli.run_plain(main)
