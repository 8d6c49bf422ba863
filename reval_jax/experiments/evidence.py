"""The evidence of issue #29: prioritized against uniform replay, where reuse stops paying, and the
baselines at equal generation budgets, from one rerunnable script.

    python -m reval_jax.experiments.evidence --out=docs/evidence [--parts=per,reuse,table,per_tiny] [--seeds=5]
        [--stop_by=HH:MM] [--dry_run] [--report_only]

Every run is `reval_jax.run.train.run` (configs as in reval_jax/experiments/one_prompt.py, whose
helpers this reuses); its record (setting, seed, config, per-round accuracy curve, rounds to the
target, wall time per round, the replay probe) is kept as --out/runs/<part>/<name>_s<seed>.json,
and a run whose record exists is skipped: the script resumes, and a larger --seeds adds seeds.
Runs go seed by seed (every setting's seed 0, then seed 1, ...), so a cut-off run is balanced.

Parts:
  per    prioritized (α 0.6, 1.0) against uniform replay on the one-prompt hard level, for
         K = 2, 4, 8 updates per round and a buffer of 4 or 16 rounds (18 settings): rounds to
         --target and accuracy after --fixed_round rounds. A probe hook records, every round,
         how the |δ| priorities are distributed (share of the sampling mass on the top 10% of
         the buffer, on never-sampled entries, priority age): what shows why it helps or not.
  reuse  ReVal's rounds to --target on the hard prompt as K grows (1, 2, 4, 8, 16), with the
         reference reset every round (R = K) or every 8 updates, and a buffer of 4 or 16 rounds.
  table  ReVal, TBRM, regression, GRPO, RLOO, DAPO on configs/tiny.py shortened to
         --table_rounds rounds (same prompts × samples per round: equal generation budgets;
         DAPO without extra generations), each at its learning rate chosen from --table_lrs by a
         sweep on --sweep_seeds other seeds; held-out avg@k of the last round, wall time per round.
  per_tiny  part per's 18 settings on the demo task (configs/tiny.py shortened as for the table, ReVal
         at its rate): held-out avg@k of the last round.

Writes --out/table.md (every table), --out/results.json (every summary) and the PNGs. Missed
targets count as max_rounds + 1 (a censored value, so means and intervals are lower bounds);
a run stopped at the target keeps its last accuracy for the later rounds. Intervals: 95%, of the
mean by Student t and of a difference by Welch's t (--boot=N: percentile bootstrap instead).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import shutil
import time
import types
from pathlib import Path

import numpy as np

from reval_jax.experiments import one_prompt
from reval_jax.run.trainer import Hook

PARTS = ("per", "reuse", "table", "per_tiny")
TABLE_ALGORITHMS = ("reval", "tbrm", "regression", "grpo", "rloo", "dapo")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One cell of a part: what its runs change from the part's base config (the seed aside)."""

    part: str
    algorithm: str = "reval"
    updates: int = 1
    buffer_rounds: int = 4
    reset_every: int = 8
    prioritized: bool = False
    alpha: float = 0.6
    learning_rate: float = 5e-4

    @property
    def name(self) -> str:
        replay = f"per{self.alpha:g}" if self.prioritized else "uniform"
        if self.part in ("per", "per_tiny"):
            return f"K{self.updates}_cap{self.buffer_rounds}_{replay}"
        if self.part == "reuse":
            return f"K{self.updates}_R{self.reset_every}_cap{self.buffer_rounds}"
        return f"{self.algorithm}_lr{self.learning_rate:g}"


def per_settings(part: str = "per") -> list[Setting]:
    """Part `per` (or `per_tiny`): K × capacity × {uniform, α 0.6, α 1.0}."""
    return [Setting(part, updates=k, buffer_rounds=cap, prioritized=alpha is not None, alpha=alpha or 0.6)
            for k in (2, 4, 8) for cap in (4, 16) for alpha in (None, 0.6, 1.0)]


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
    return c


# ----------------------------------------------------------------------------- the replay probe


class PriorityProbe(Hook):
    """After every round, how the prioritized buffer's sampling mass is spread: the share of
    P(i) ∝ p_i^α on the top 10% of entries, on entries never sampled (whose priority is still the
    largest ever seen, given at insertion), the mean age (rounds) of the priorities P weighs
    (since they were last set), and the P-weighted and plain mean generation age of the entries."""

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


@contextlib.contextmanager
def probing(hook: Hook):
    """train.run with `hook` attached after its own hooks (train.run takes no hooks: its `_hooks`
    is wrapped for the duration)."""
    from reval_jax.run import train

    original = train._hooks

    def hooks(trainer, *a, **k):
        original(trainer, *a, **k)
        trainer.add_hook(hook)

    train._hooks = hooks
    try:
        yield hook
    finally:
        train._hooks = original


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
    """Runs `config` in a fresh scratch workdir and writes its record to `path`."""
    from reval_jax.run import train

    workdir = scratch / f"{setting.part}_{setting.name}_s{seed}"
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    with probing(PriorityProbe()) as probe:
        train.run(config, str(workdir))
    record = run_record(setting, seed, config, workdir, time.perf_counter() - start, target, key, probe.rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({k: record[k] for k in ("part", "name", "seed", "rounds_to_target", "rounds_run", "seconds")}),
          flush=True)
    return record


def record_path(out: Path, part: str, name: str, seed: int) -> Path:
    return out / "runs" / part / f"{name}_s{seed}.json"


def load_runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]


# ----------------------------------------------------------------------------- aggregation


def mean_ci(values, *, boot: int = 0, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Interval of the mean of `values`: Student t (`boot` 0) or a percentile bootstrap of `boot`
    resamples (which is too narrow with few seeds); (nan, nan) with fewer than 2 values."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float("nan"), float("nan")
    if boot:
        means = v[np.random.default_rng(seed).integers(0, len(v), (boot, len(v)))].mean(axis=1)
        lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)
    from scipy import stats

    half = stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def diff_ci(a, b, *, boot: int = 0, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) − mean(b) and its interval: Welch's t (`boot` 0) or a percentile bootstrap with the two
    samples resampled apart."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    if len(a) < 2 or len(b) < 2:
        return d, float("nan"), float("nan")
    if boot:
        rng = np.random.default_rng(seed)
        ds = a[rng.integers(0, len(a), (boot, len(a)))].mean(1) - b[rng.integers(0, len(b), (boot, len(b)))].mean(1)
        lo, hi = np.quantile(ds, [(1 - level) / 2, (1 + level) / 2])
        return d, float(lo), float(hi)
    from scipy import stats

    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return d, d, d
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf((1 + level) / 2, df) * np.sqrt(va + vb)
    return d, d - float(half), d + float(half)


def censored_rounds(run: dict) -> int:
    """Rounds to the target; max_rounds + 1 for a run that missed it."""
    r = run["rounds_to_target"]
    return run["max_rounds"] + 1 if r is None else int(r)


def accuracy_at(run: dict, round_: int) -> float:
    """The accuracy of the last evaluation at or before `round_` (a run stopped at the target keeps it)."""
    points = [a for i, a in run["curve"] if i <= round_]
    return float(points[-1]) if points else float("nan")


def summarize_cell(runs: list[dict], fixed_round: int, boot: int) -> dict:
    """Rounds to target, accuracy at `fixed_round`, last accuracy and time per round of one cell's runs."""
    rounds = [censored_rounds(r) for r in runs]
    acc = [accuracy_at(r, fixed_round) for r in runs]
    last = [r["curve"][-1][1] if r["curve"] else float("nan") for r in runs]
    probe = [row for r in runs for row in r.get("probe", [])]
    return {
        "n": len(runs), "seeds": sorted(r["seed"] for r in runs), "rounds": rounds,
        "missed": sum(r["rounds_to_target"] is None for r in runs),
        "rounds_mean": float(np.mean(rounds)), "rounds_median": float(np.median(rounds)),
        "rounds_ci": mean_ci(rounds, boot=boot), "acc_at": acc, "acc_at_mean": float(np.mean(acc)),
        "acc_at_ci": mean_ci(acc, boot=boot), "last": last, "last_mean": float(np.mean(last)),
        "last_ci": mean_ci(last, boot=boot),
        "seconds_mean": float(np.mean([r["seconds"] for r in runs])),
        "seconds_per_round": float(np.mean([r["seconds_per_round"] for r in runs])),
        "train_s_per_round": float(np.mean([r["train_s_per_round"] or np.nan for r in runs])),
        "probe": {k: float(np.nanmean([row[k] for row in probe])) for k in probe[0] if k != "iteration"}
        if probe else {},
    }


def summarize(runs: list[dict], fixed_round: int, boot: int) -> dict[str, dict[str, dict]]:
    """{part: {setting name: cell summary}} over every run record."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        cells.setdefault((r["part"], r["name"]), []).append(r)
    out: dict[str, dict[str, dict]] = {}
    for (part, name), group in sorted(cells.items()):
        out.setdefault(part, {})[name] = {"setting": group[0]["setting"], **summarize_cell(group, fixed_round, boot)}
    return out


def choose_rates(sweep: dict[str, dict], lrs: tuple[float, ...]) -> dict[str, float]:
    """Per algorithm, the learning rate whose sweep runs reached the best mean last accuracy; an
    algorithm whose sweep is incomplete (a rate without runs) gets none."""
    chosen = {}
    for a in TABLE_ALGORITHMS:
        cells = [sweep.get(Setting("table_sweep", algorithm=a, learning_rate=lr).name) for lr in lrs]
        if cells and all(cells):
            chosen[a] = lrs[int(np.argmax([c["last_mean"] for c in cells]))]
    return chosen


# ----------------------------------------------------------------------------- tables


def _ci(lo: float, hi: float, fmt: str = ".1f") -> str:
    return "" if np.isnan(lo) else f" [{lo:{fmt}}, {hi:{fmt}}]"


def rounds_cell(c: dict | None) -> str:
    """`mean [lo, hi], med m (n=…, x missed)`: rounds to the target of one cell."""
    if not c:
        return "not run"
    missed = f", {c['missed']} missed" if c["missed"] else ""
    return f"{c['rounds_mean']:.1f}{_ci(*c['rounds_ci'])}, med {c['rounds_median']:g} (n={c['n']}{missed})"


REPLAYS = (("uniform", "uniform"), ("per0.6", "PER α=0.6"), ("per1", "PER α=1.0"))  # name part, title
GRID = tuple((k, cap) for k in (2, 4, 8) for cap in (4, 16))  # (K, buffer rounds) of the parts per, per_tiny


def per_tables(per: dict[str, dict], fixed_round: int, boot: int) -> str:
    """Part `per`: rounds to the target, accuracy after `fixed_round` rounds, the difference to
    uniform replay, and the probe of the priorities."""
    replays, rows = REPLAYS, GRID
    head = "| K, buffer | " + " | ".join(t for _, t in replays) + " |\n|---|" + "---|" * len(replays) + "\n"
    text = "### Rounds to the target (mean [95% CI], median; missed runs count as max_rounds + 1)\n\n" + head
    text += "".join(f"| K={k}, {cap} rounds | " + " | ".join(rounds_cell(per.get(f"K{k}_cap{cap}_{r}"))
                                                            for r, _ in replays) + " |\n" for k, cap in rows)
    text += f"\n### Accuracy after {fixed_round} rounds (mean [95% CI])\n\n" + head
    for k, cap in rows:
        cells = [per.get(f"K{k}_cap{cap}_{r}") for r, _ in replays]
        text += f"| K={k}, {cap} rounds | " + " | ".join(
            f"{c['acc_at_mean']:.3f}{_ci(*c['acc_at_ci'], '.3f')}" if c else "not run" for c in cells) + " |\n"
    text += ("\n### PER − uniform (mean difference [95% CI]; negative rounds = PER faster)\n\n"
             "| K, buffer | α | Δ rounds | Δ accuracy after " + f"{fixed_round} |\n|---|---|---|---|\n")
    for k, cap in rows:
        base = per.get(f"K{k}_cap{cap}_uniform")
        for r, title in replays[1:]:
            c = per.get(f"K{k}_cap{cap}_{r}")
            if base and c:
                dr = diff_ci(c["rounds"], base["rounds"], boot=boot)
                dacc = diff_ci(c["acc_at"], base["acc_at"], boot=boot)
                text += (f"| K={k}, {cap} rounds | {title[4:]} | {dr[0]:+.1f}{_ci(dr[1], dr[2], '+.1f')} | "
                         f"{dacc[0]:+.3f}{_ci(dacc[1], dacc[2], '+.3f')} |\n")
    text += pooled_rows(per, boot)
    text += ("\n### The priorities, averaged over the rounds of the runs\n\n| K, buffer | α | top 10% of entries: "
             "share of P | never-sampled entries: share of buffer, of P | priority age (rounds, P-weighted) | "
             "generation age, P-weighted / uniform | max p / median sampled p |\n|---|---|---|---|---|---|---|\n")
    for k, cap in rows:
        for r, title in replays[1:]:
            p = (per.get(f"K{k}_cap{cap}_{r}") or {}).get("probe")
            if p:
                text += (f"| K={k}, {cap} rounds | {title[4:]} | {p['top10_mass']:.2f} | {p['unsampled_share']:.2f}, "
                         f"{p['unsampled_mass']:.2f} | {p['priority_age']:.2f} | {p['age_weighted']:.2f} / "
                         f"{p['age_uniform']:.2f} | {p['p_max'] / p['sampled_p_median']:.1f} |\n")
    return text


def pooled_rows(per: dict[str, dict], boot: int) -> str:
    """PER − uniform with the runs of several (K, buffer) cells pooled (only where every cell has both
    arms, with as many runs each: the difference is then the mean of the cells' differences; the
    interval ignores the cells, which widens it)."""
    text = ""
    for label, rows in (("K ≥ 4, pooled", [g for g in GRID if g[0] >= 4]), ("all, pooled", list(GRID))):
        for r, title in REPLAYS[1:]:
            pairs = [(per.get(f"K{k}_cap{cap}_{r}"), per.get(f"K{k}_cap{cap}_uniform")) for k, cap in rows]
            if not all(c and b and c["n"] == b["n"] for c, b in pairs):
                continue
            dr = diff_ci(sum((c["rounds"] for c, _ in pairs), []), sum((b["rounds"] for _, b in pairs), []), boot=boot)
            da = diff_ci(sum((c["acc_at"] for c, _ in pairs), []), sum((b["acc_at"] for _, b in pairs), []), boot=boot)
            text += (f"| {label} | {title[4:]} | {dr[0]:+.1f}{_ci(dr[1], dr[2], '+.1f')} | "
                     f"{da[0]:+.3f}{_ci(da[1], da[2], '+.3f')} |\n")
    return text


def per_tiny_table(cells: dict[str, dict], boot: int) -> str:
    """Part `per_tiny`: held-out accuracy of the last round per (K, buffer) and replay, and PER − uniform."""
    text = ("| K, buffer | " + " | ".join(t for _, t in REPLAYS) + " | α=0.6 − uniform | α=1.0 − uniform |\n|---|"
            + "---|" * 5 + "\n")
    for k, cap in GRID:
        c = [cells.get(f"K{k}_cap{cap}_{r}") for r, _ in REPLAYS]
        diffs = [diff_ci(x["last"], c[0]["last"], boot=boot) if x and c[0] else None for x in c[1:]]
        text += (f"| K={k}, {cap} rounds | "
                 + " | ".join(f"{x['last_mean']:.3f}{_ci(*x['last_ci'], '.3f')}, n={x['n']}" if x else "not run"
                              for x in c) + " | "
                 + " | ".join(f"{d[0]:+.3f}{_ci(d[1], d[2], '+.3f')}" if d else "—" for d in diffs) + " |\n")
    return text


def reuse_table(reuse: dict[str, dict]) -> str:
    """Part `reuse`: rounds to the target per K (rows) and reset cadence × buffer (columns)."""
    cols = [("K", 4), ("K", 16), (8, 4), (8, 16)]
    text = ("| K | " + " | ".join(f"R={r}, {cap} rounds" for r, cap in cols) + " |\n|---|" + "---|" * len(cols)
            + "\n")
    for k in (1, 2, 4, 8, 16):
        cells = [reuse.get(f"K{k}_R{k if r == 'K' else r}_cap{cap}") for r, cap in cols]
        text += f"| {k} | " + " | ".join(rounds_cell(c) for c in cells) + " |\n"
    text += ("\nWall seconds of a run (stopped at the target; one CPU core), mean, and per round:\n\n"
             + text[:text.index("\n", text.index("\n") + 1) + 1])
    for k in (1, 2, 4, 8, 16):
        cells = [reuse.get(f"K{k}_R{k if r == 'K' else r}_cap{cap}") for r, cap in cols]
        text += f"| {k} | " + " | ".join(f"{c['seconds_mean']:.0f} ({c['seconds_per_round']:.1f} per round)" if c
                                         else "not run" for c in cells) + " |\n"
    return text


def table_table(table: dict[str, dict], sweep: dict[str, dict], chosen: dict[str, float], key: str) -> str:
    """Part `table`: per algorithm its rate (and the sweep behind it), held-out accuracy, time per round."""
    text = (f"| algorithm | learning rate (sweep: rate → mean last {key}) | held-out {key}, last round "
            "(mean [95% CI], n) | s per round (all) | s per round (generate + update) |\n|---|---|---|---|---|\n")
    for a in TABLE_ALGORITHMS:
        swept = [(c["setting"]["learning_rate"], c["last_mean"]) for c in sweep.values()
                 if c["setting"]["algorithm"] == a]
        lr = chosen.get(a)
        c = table.get(Setting("table", algorithm=a, learning_rate=lr).name) if lr else None
        sweep_text = ", ".join(f"{x:g} → {y:.3f}" for x, y in sorted(swept)) or "not run"
        result = (f"{c['last_mean']:.3f}{_ci(*c['last_ci'], '.3f')}, n={c['n']} | {c['seconds_per_round']:.2f} | "
                  f"{c['train_s_per_round']:.2f}") if c else "not run | — | —"
        text += f"| {a} | {lr if lr else '—'} ({sweep_text}) | {result} |\n"
    return text


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per(runs: list[dict], path: Path) -> None:
    """Mean accuracy per round (a stopped run keeps its last value) of every `per` cell, one panel per
    (K, buffer), and the rounds to target with their intervals."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharey=True)
    for col, k in enumerate((2, 4, 8)):
        for row, cap in enumerate((4, 16)):
            ax = axes[row, col]
            for replay in ("uniform", "per0.6", "per1"):
                group = [r for r in runs if r["part"] == "per" and r["name"] == f"K{k}_cap{cap}_{replay}"]
                if group:
                    cap_rounds = max(r["max_rounds"] for r in group)
                    xs = np.arange(cap_rounds + 1)
                    ax.plot(xs, [np.mean([accuracy_at(r, x) for r in group]) for x in xs],
                            label=f"{replay} (n={len(group)})")
            ax.set_title(f"K={k}, buffer {cap} rounds", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            ax.set_xlabel("generation round") if row else None
            ax.set_ylabel("accuracy (mean over seeds)") if not col else None
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_rounds(cells: dict[str, dict], groups: dict[str, list[str]], xs: list, xlabel: str, path: Path,
                log_x: bool = False) -> None:
    """Mean rounds to the target with 95% intervals: one line per group of cell names over `xs`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, names) in enumerate(groups.items()):
        pts = [(x, cells[n]) for x, n in zip(xs, names, strict=True) if n in cells]
        if not pts:
            continue
        shift = 0.06 * (i - (len(groups) - 1) / 2)
        x = (np.array([p[0] for p in pts], float) * 2**shift if log_x
             else np.array([xs.index(p[0]) for p in pts], float) + shift)
        mean = np.array([c["rounds_mean"] for _, c in pts])
        ci = np.array([c["rounds_ci"] for _, c in pts]).T
        err = np.nan_to_num(np.abs(ci - mean))
        ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=label)
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    else:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rounds to target (mean, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_table(table: dict[str, dict], chosen: dict[str, float], key: str, path: Path) -> None:
    plt = _pyplot()
    cells = [(a, table.get(Setting("table", algorithm=a, learning_rate=chosen[a]).name)) for a in chosen]
    cells = [(a, c) for a, c in cells if c]
    if not cells:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    mean = np.array([c["last_mean"] for _, c in cells])
    err = np.nan_to_num(np.abs(np.array([c["last_ci"] for _, c in cells]).T - mean))
    ax.bar([a for a, _ in cells], mean, yerr=err, capsize=4)
    ax.set_ylabel(f"held-out {key}, last round")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(out: Path, args) -> dict:
    """Every table, summary and plot from the run records under `out`/runs."""
    runs = load_runs(out)
    summary = summarize(runs, args.fixed_round, args.boot)
    per, reuse = summary.get("per", {}), summary.get("reuse", {})
    sweep, table = summary.get("table_sweep", {}), summary.get("table", {})
    lrs = tuple(float(x) for x in args.table_lrs.split(","))
    chosen = choose_rates(sweep, lrs)
    key = f"avg@{table_config(Setting('table'), 0, args).eval.k}"
    text = f"# Evidence tables (written by reval_jax.experiments.evidence from {len(runs)} runs)\n\n"
    text += f"## Prioritized against uniform replay (one-prompt hard level, target {args.target})\n\n"
    text += per_tables(per, args.fixed_round, args.boot)
    text += f"\n## Where reuse stops paying: ReVal rounds to {args.target}\n\n" + reuse_table(reuse)
    text += (f"\n## Baselines at equal generation budgets (configs/tiny.py, {args.table_rounds} rounds)\n\n"
             + table_table(table, sweep, chosen, key))
    if summary.get("per_tiny"):
        text += (f"\n## Prioritized against uniform replay on the demo task (configs/tiny.py, {args.table_rounds} "
                 f"rounds): held-out {key} of the last round\n\n" + per_tiny_table(summary["per_tiny"], args.boot))
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "summary": summary, "chosen_rates": chosen},
                                                 indent=1))
    if per:
        plot_per(runs, out / "per_curves.png")
        plot_rounds(per, {r: [f"K{k}_cap{cap}_{r}" for k in (2, 4, 8) for cap in (4, 16)]
                          for r in ("uniform", "per0.6", "per1")},
                    [f"K{k},{cap}" for k in (2, 4, 8) for cap in (4, 16)], "K, buffer rounds", out / "per_rounds.png")
    if reuse:
        plot_rounds(reuse, {f"R={r}, buffer {cap}": [f"K{k}_R{k if r == 'K' else r}_cap{cap}"
                                                     for k in (1, 2, 4, 8, 16)]
                            for r in ("K", 8) for cap in (4, 16)},
                    [1, 2, 4, 8, 16], "updates per round K", out / "reuse_rounds.png", log_x=True)
    if table:
        plot_table(table, chosen, key, out / "table.png")
    print(text)
    return summary


# ----------------------------------------------------------------------------- main


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
    p.add_argument("--table_rounds", type=int, default=20, help="configs/tiny.py's 60 rounds shortened to this")
    p.add_argument("--table_lrs", default="1e-4,3e-4,1e-3", help="the learning-rate sweep of part table")
    p.add_argument("--sweep_seeds", type=int, default=1, help="seeds (1000, 1001, ...) of the sweep")
    p.add_argument("--boot", type=int, default=0,
                   help="intervals: 0 = Student t (Welch for differences); N = percentile bootstrap of N resamples")
    p.add_argument("--scratch", default="/tmp/reval_evidence_runs", help="workdirs while a run lasts")
    p.add_argument("--cache", default="/tmp/reval_evidence_jax_cache", help="JAX compilation cache")
    p.add_argument("--stop_by", default="", help="HH:MM UTC: start no run after this time")
    p.add_argument("--dry_run", action="store_true", help="list the runs left and an estimate of their time")
    p.add_argument("--report_only", action="store_true", help="only the tables and plots from the records")
    return p


def planned(part: str, args, out: Path) -> list[tuple[Setting, int]]:
    """The runs of `part` still without a record, seed by seed (the table's after its sweep's choice)."""
    if part in ("per", "reuse", "per_tiny"):
        settings = {"per": per_settings, "reuse": reuse_settings, "per_tiny": lambda: per_settings(part)}[part]()
        seeds = range(args.seeds)
    elif part == "table_sweep":
        lrs = tuple(float(x) for x in args.table_lrs.split(","))
        settings, seeds = table_settings(part, {a: lrs for a in TABLE_ALGORITHMS}), range(1000, 1000 + args.sweep_seeds)
    else:
        lrs = tuple(float(x) for x in args.table_lrs.split(","))
        chosen = choose_rates(summarize(load_runs(out), args.fixed_round, 0).get("table_sweep", {}), lrs)
        settings, seeds = table_settings(part, {a: (lr,) for a, lr in chosen.items()}), range(args.seeds)
    return [(s, seed) for seed in seeds for s in settings if not record_path(out, part, s.name, seed).exists()]


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
    if args.dry_run:
        _estimate(parts, args, out)
        return {}
    if not args.report_only:
        import jax

        from reval_jax.experiments import toy

        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        model_dir = args.model or str(toy.ASSET_DIR)
        prompt_file = _prompt_file(out, args, model_dir) if {"per", "reuse"} & set(parts) else ""
        for part in parts:
            for setting, seed in planned(part, args, out):
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
