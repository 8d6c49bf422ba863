"""The evidence of issue #29: prioritized against uniform replay, where reuse stops paying, and the
baselines at equal generation budgets, from one rerunnable script.

    python -m reval_jax.experiments.evidence --out=docs/evidence [--parts=per,reuse,table,per_tiny] [--seeds=5]
        [--stop_by=HH:MM] [--shard=I/N] [--dry_run] [--report_only]

Every run is `reval_jax.run.train.run` (configs as in reval_jax/experiments/one_prompt.py, whose
helpers this reuses); its record (setting, seed, config, per-round accuracy curve, rounds to the
target, wall time per round, the replay probe) is kept as --out/runs/<part>/<name>_s<seed>.json,
and a run whose record exists is skipped: the script resumes, and a larger --seeds adds seeds.
Runs go seed by seed (every setting's seed 0, then seed 1, ...), so a cut-off run is balanced.

Parts:
  per    prioritized (α 0.6, 1.0; and α 1.0 with replay.fresh_priority = delta) against uniform
         replay on the one-prompt hard level, for K = 2, 4, 8 updates per round and a buffer of 4
         or 16 rounds (24 settings): rounds to
         --target and accuracy after --fixed_round rounds. A probe hook records, every round,
         how the |δ| priorities are distributed (share of the sampling mass on the top 10% of
         the buffer, on never-sampled entries, priority age): what shows why it helps or not.
  reuse  ReVal's rounds to --target on the hard prompt as K grows (1, 2, 4, 8, 16), with the
         reference reset every round (R = K) or every 8 updates, and a buffer of 4 or 16 rounds.
  table  ReVal, TBRM, regression, GRPO, RLOO, DAPO on configs/tiny.py shortened to
         --table_rounds rounds (same prompts × samples per round: equal generation budgets;
         DAPO without extra generations), each at its learning rate chosen from --table_lrs by a
         sweep on --sweep_seeds other seeds; held-out avg@k of the last round, wall time per round.
  per_tiny  part per's 24 settings on the demo task (configs/tiny.py shortened as for the table, ReVal
         at its rate): held-out avg@k of the last round and after --fixed_round rounds, the first
         evaluated round at or above --tiny_target (the runs do not stop there), the probe.

Writes --out/table.md (every table), --out/results.json (every summary) and the PNGs. Missed
targets count as max_rounds + 1 (a censored value, so means and intervals are lower bounds);
a run stopped at the target keeps its last accuracy for the later rounds. Intervals: 95%, of the
mean by Student t and of a difference by Welch's t (--boot=N: percentile bootstrap instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import time
import types
from pathlib import Path

import numpy as np

from reval_jax.experiments import evidence_report, one_prompt
from reval_jax.experiments.evidence_report import (  # noqa: F401 (re-exported: the tests read them here)
    TABLE_ALGORITHMS,
    Setting,
    accuracy_at,
    censored_rounds,
    choose_rates,
    diff_ci,
    load_runs,
    mean_ci,
    per_tables,
    per_tiny_table,
    reached_at,
    record_path,
    summarize,
    summarize_cell,
)
from reval_jax.run.trainer import Hook

PARTS = ("per", "reuse", "table", "per_tiny")
CODE_VERSION = "unknown"  # code_version(), set by main()


def per_settings(part: str = "per") -> list[Setting]:
    """Part `per` (or `per_tiny`): K × capacity × {uniform, α 0.6, α 1.0, α 1.0 with a new round's
    priority its own |δ| (replay.fresh_priority = delta) instead of the largest seen}."""
    arms = ((None, "max"), (0.6, "max"), (1.0, "max"), (1.0, "delta"))
    return [Setting(part, updates=k, buffer_rounds=cap, prioritized=alpha is not None, alpha=alpha or 0.6, fresh=fresh)
            for k in (2, 4, 8) for cap in (4, 16) for alpha, fresh in arms]


def reuse_settings() -> list[Setting]:
    """Part `reuse`: K × reset cadence (every round, every 8 updates; once where they agree) × capacity."""
    return [Setting("reuse", updates=k, buffer_rounds=cap, reset_every=r)
            for k in (1, 2, 4, 8, 16) for r in sorted({k, 8}) for cap in (4, 16)]


def table_settings(part: str, lrs: dict[str, tuple[float, ...]]) -> list[Setting]:
    """Part `table` (or its sweep, part `table_sweep`): each algorithm at each of its learning rates."""
    return [Setting(part, algorithm=a, learning_rate=lr) for a in TABLE_ALGORITHMS for lr in lrs.get(a, ())]


# ----------------------------------------------------------------------------- configs


def one_prompt_config(setting: Setting, seed: int, model_dir: str, prompt_file: str, args):
    """The one-prompt hard-level run of `setting` (one_prompt.run_config, replay fields changed)."""
    ns = types.SimpleNamespace(max_rounds=args.max_rounds, samples=args.samples, max_new_tokens=args.max_new_tokens,
                               beta=args.beta, learning_rate=setting.learning_rate, reset_every=setting.reset_every,
                               buffer_rounds=setting.buffer_rounds, eval_samples=args.eval_samples,
                               target=args.target)
    c = one_prompt.run_config(model_dir, prompt_file, algorithm=setting.algorithm, updates=setting.updates,
                              seed=seed, args=ns)
    c.replay.prioritized = setting.prioritized
    c.replay.alpha = setting.alpha
    c.replay.fresh_priority = setting.fresh
    c.compile_cache = ""  # one cache for every run, set in main
    return c


def table_config(setting: Setting, seed: int, args):
    """configs/tiny.py shortened to `args.table_rounds` rounds, for `setting`'s algorithm and rate (part
    `per_tiny`: ReVal at tiny.py's rate with `setting`'s replay)."""
    from configs import tiny

    c = tiny.get_config()
    c.seed = seed
    c.algorithm = setting.algorithm
    c.optimizer.learning_rate = setting.learning_rate
    c.num_iterations = args.table_rounds
    c.dapo.max_extra_generations = 0  # no refills of dropped groups: the same generations as the others
    c.eval.every = max(1, args.table_rounds // 4)
    c.checkpoint.every = 10**6
    c.compile_cache = ""
    c.progress = False
    c.reward.num_workers = 1
    if setting.part == "per_tiny":
        c.replay.updates_per_iteration = setting.updates
        c.replay.capacity = setting.buffer_rounds * c.data.prompts_per_iteration * c.sampling.num_samples
        c.replay.prioritized, c.replay.alpha = setting.prioritized, setting.alpha
        c.replay.fresh_priority = setting.fresh
    return c


# ----------------------------------------------------------------------------- the replay probe


class PriorityProbe(Hook):
    """After every round, how the prioritized buffer's sampling mass is spread: the share of
    P(i) ∝ p_i^α on the top 10% of entries, on entries never sampled (whose priority is still the
    largest ever seen, given at insertion, unless replay.fresh_priority = delta), the mean age
    (rounds) of the priorities P weighs (since they were last set), and the P-weighted and plain mean
    generation age of the entries."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []
        self._set_at: dict[int, int] = {}  # entry id (its insertion number) -> round its priority was last set
        self._last: dict[int, float] = {}

    def on_round_end(self, trainer, iteration, metrics):
        buffer = trainer.buffer
        if not buffer.prioritized or not len(buffer):
            return
        p = buffer.priorities()
        ids = int(buffer.stats()["num_added"]) - len(p) + np.arange(len(p))
        for i, value in zip(ids.tolist(), p.tolist(), strict=True):
            if self._last.get(i) != value:
                self._set_at[i], self._last[i] = iteration, value
        self.rows.append(priority_stats(p, buffer.alpha, buffer.uses(),
                                        np.asarray(buffer.contents().iteration, np.int64), iteration,
                                        np.array([self._set_at[i] for i in ids.tolist()])))


def priority_stats(p: np.ndarray, alpha: float, uses: np.ndarray, born: np.ndarray, iteration: int,
                   set_at: np.ndarray) -> dict[str, float]:
    """The probe's figures for priorities `p` (oldest first), their uses, generation rounds and
    rounds their priority was set."""
    mass = p**alpha / np.sum(p**alpha)
    top = max(1, int(np.ceil(0.1 * len(p))))
    unsampled = uses == 0
    return {
        "iteration": iteration,
        "top10_mass": float(np.sort(mass)[::-1][:top].sum()),
        "unsampled_share": float(unsampled.mean()),
        "unsampled_mass": float(mass[unsampled].sum()),
        "priority_age": float(np.sum(mass * (iteration - set_at))),
        "age_weighted": float(np.sum(mass * (iteration - born))),
        "age_uniform": float(np.mean(iteration - born)),
        "sampled_p_median": float(np.median(p[~unsampled])) if (~unsampled).any() else float("nan"),
        "p_max": float(p.max()),
    }


def code_version() -> str:
    """The commit this process's library was imported from (+ "-dirty" when reval_jax/ or configs/
    differ from it): taken once, when the script starts, since a process keeps the code it imported."""
    root = Path(__file__).resolve().parents[2]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--", "reval_jax", "configs") else "")


# ----------------------------------------------------------------------------- one run


def run_record(setting: Setting, seed: int, config, workdir: Path, seconds: float, target: float, key: str,
               probe: list[dict]) -> dict:
    """The JSON of a finished run, from its metrics."""
    from reval_jax.run.metrics import read_metrics

    records = read_metrics(workdir)
    evals = [(r["iteration"], float(r[key])) for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    rounds_run = max((r["iteration"] for r in train), default=0)
    return {
        "part": setting.part, "name": setting.name, "setting": dataclasses.asdict(setting), "seed": seed,
        "config": json.loads(config.to_json_best_effort()), "max_rounds": int(config.num_iterations),
        "target": target, "curve": evals,
        "rounds_to_target": next((i for i, a in evals if target > 0 and a >= target), None),
        "rounds_run": rounds_run, "seconds": seconds, "seconds_per_round": seconds / max(rounds_run, 1),
        "train_s_per_round": float(np.mean([r["generate_s"] + r["update_s"] for r in train])) if train else None,
        "probe": probe,
    }


def execute(setting: Setting, seed: int, config, path: Path, scratch: Path, target: float, key: str) -> dict:
    """Runs `config` in a fresh scratch workdir of this process's own and writes its record to `path`."""
    from reval_jax.run import train

    workdir = scratch / f"{setting.part}_{setting.name}_s{seed}_{os.getpid()}"  # never shared by two processes
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    probe = PriorityProbe()
    train.run(config, str(workdir), hooks=(probe,))
    record = run_record(setting, seed, config, workdir, time.perf_counter() - start, target, key, probe.rows)
    record["code"] = CODE_VERSION
    if record["rounds_run"] < record["max_rounds"] and record["rounds_to_target"] is None:
        raise SystemExit(f"{setting.part} {setting.name} seed {seed} stopped after round {record['rounds_run']} of "
                         f"{record['max_rounds']} (a signal?): not recorded; the same command runs it again")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({k: record[k] for k in ("part", "name", "seed", "rounds_to_target", "rounds_run", "seconds")}),
          flush=True)
    return record


def report(out: Path, args) -> dict:
    """evidence_report.report with the table runs' held-out metric (avg@k of their config)."""
    return evidence_report.report(out, args, f"avg@{table_config(Setting('table'), 0, args).eval.k}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/evidence")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--prompts", default="docs/one_prompt/prompts.json",
                   help="the one-prompt experiment's chosen prompts (chosen afresh as it does when missing)")
    p.add_argument("--level", default="hard")
    p.add_argument("--model", default="", help="HF directory (default: the embedded tiny_arith model)")
    p.add_argument("--max_rounds", type=int, default=60, help="one-prompt runs: rounds before giving up")
    p.add_argument("--fixed_round", type=int, default=10, help="accuracy reported after this many rounds")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--eval_samples", type=int, default=128)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max_new_tokens", type=int, default=80)
    p.add_argument("--tiny_target", type=float, default=0.6,
                   help="part per_tiny: held-out accuracy whose first evaluated round is its rounds to the target")
    p.add_argument("--table_rounds", type=int, default=20, help="configs/tiny.py's 60 rounds shortened to this")
    p.add_argument("--table_lrs", default="1e-5,3e-5,1e-4,3e-4,1e-3", help="the learning-rate sweep of part table")
    p.add_argument("--sweep_seeds", type=int, default=1, help="seeds (1000, 1001, ...) of the sweep")
    p.add_argument("--boot", type=int, default=0,
                   help="intervals: 0 = Student t (Welch for differences); N = percentile bootstrap of N resamples")
    p.add_argument("--scratch", default="/tmp/reval_evidence_runs", help="workdirs while a run lasts")
    p.add_argument("--cache", default="/tmp/reval_evidence_jax_cache", help="JAX compilation cache")
    p.add_argument("--stop_by", default="", help="HH:MM UTC: start no run after this time")
    p.add_argument("--shard", default="0/1", help="I/N: every N-th run of each part from the I-th (0-based): "
                   "N processes with I = 0..N-1 share the runs (one core each)")
    p.add_argument("--dry_run", action="store_true", help="list the runs left and an estimate of their time")
    p.add_argument("--report_only", action="store_true", help="only the tables and plots from the records")
    return p


def planned(part: str, args, out: Path) -> list[tuple[Setting, int]]:
    """The runs of `part` still without a record, seed by seed (the table's once its whole sweep is
    done, at the rates it chose); with --shard I/N, those of every N-th run of the whole list from the
    I-th (a run's shard does not depend on which runs are done)."""
    if part in ("per", "reuse", "per_tiny"):
        settings = {"per": per_settings, "reuse": reuse_settings, "per_tiny": lambda: per_settings(part)}[part]()
        seeds = range(args.seeds)
    elif part == "table_sweep":
        lrs = tuple(float(x) for x in args.table_lrs.split(","))
        settings, seeds = table_settings(part, {a: lrs for a in TABLE_ALGORITHMS}), range(1000, 1000 + args.sweep_seeds)
    else:
        lrs = tuple(float(x) for x in args.table_lrs.split(","))
        chosen = choose_rates(summarize(load_runs(out), args.fixed_round, 0).get("table_sweep", {}), lrs)
        if set(chosen) != set(TABLE_ALGORITHMS):
            return []  # the sweep is not complete: the table waits (--shard processes must agree on its list)
        settings, seeds = table_settings(part, {a: (lr,) for a, lr in chosen.items()}), range(args.seeds)
    i, n = _shard(args.shard)
    runs = [(s, seed) for seed in seeds for s in settings][i::n]
    return [(s, seed) for s, seed in runs if not record_path(out, part, s.name, seed).exists()]


def _shard(text: str) -> tuple[int, int]:
    """--shard I/N as (I, N), or a one-line SystemExit."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise SystemExit(f"--shard={text}: expected I/N with 0 <= I < N, e.g. --shard=1/2")
    return i, n


def _past(stop_by: str) -> bool:
    if not stop_by:
        return False
    now = datetime.datetime.now(datetime.UTC)
    hour, minute = (int(x) for x in stop_by.split(":"))
    return (now.hour, now.minute) >= (hour, minute)


def _estimate(parts: list[str], args, out: Path) -> None:
    """Runs left per part and their time, from the mean seconds of the part's finished runs (or, for
    none, the one-prompt experiment's ~47 s per run and ~8 s per tiny round, generation + 2 updates + evals)."""
    runs = load_runs(out)
    for part in parts:
        left = planned(part, args, out)
        done = [r["seconds"] for r in runs if r["part"] == part]
        each = float(np.mean(done)) if done else (47.0 if part in ("per", "reuse") else 8.0 * args.table_rounds)
        print(f"{part}: {len(left)} runs left, about {len(left) * each / 60:.0f} min at {each:.0f} s per run"
              + ("" if done else " (a guess: no run of the part yet)"))


def _prompt_file(out: Path, args, model_dir: str) -> str:
    """The one-prompt level's prompt as a one-line jsonl under `out`."""
    from reval_jax.experiments import toy

    path = Path(args.prompts)
    if path.exists():
        chosen = json.loads(path.read_text())[args.level]
    else:
        from reval_jax.model.hf import load_hf

        model, tokenizer = load_hf(model_dir)
        problem, answer, base = one_prompt.choose_prompt(model, tokenizer, args.level, candidates=16, samples=128,
                                                         seed=0, max_new_tokens=args.max_new_tokens)
        chosen = {"problem": problem, "answer": answer, "base_success": base}
    file = out / f"prompt_{args.level}.jsonl"
    file.write_text(json.dumps({"id": f"one_prompt-{args.level}", "problem": chosen["problem"],
                                "answer": chosen["answer"], "source": f"{toy.SOURCE}_{args.level}"}) + "\n")
    return str(file)


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from {PARTS}")
    parts = [q for p in parts for q in (("table_sweep", "table") if p == "table" else (p,))]
    _shard(args.shard)  # refused before any run
    if args.dry_run:
        _estimate(parts, args, out)
        return {}
    if not args.report_only:
        import jax

        global CODE_VERSION
        CODE_VERSION = code_version()

        from reval_jax.experiments import toy

        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        model_dir = args.model or str(toy.ASSET_DIR)
        prompt_file = _prompt_file(out, args, model_dir) if {"per", "reuse"} & set(parts) else ""
        for part in parts:
            for setting, seed in planned(part, args, out):
                if record_path(out, part, setting.name, seed).exists():
                    continue  # made meanwhile by another process
                if _past(args.stop_by):
                    print(f"--stop_by={args.stop_by} passed: no more runs", flush=True)
                    return report(out, args)
                one = part in ("per", "reuse")
                config = (one_prompt_config(setting, seed, model_dir, prompt_file, args) if one
                          else table_config(setting, seed, args))
                key = f"avg@{config.eval.k}"
                execute(setting, seed, config, record_path(out, part, setting.name, seed), Path(args.scratch),
                        args.target if one else 0.0, key)
    return report(out, args)


if __name__ == "__main__":
    from reval_jax.run import cli

    cli.run_plain(main)
