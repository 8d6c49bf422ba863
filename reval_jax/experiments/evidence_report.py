"""The tables, intervals and plots of issue #29's evidence (reval_jax/experiments/evidence.py runs it):
the settings' names, the run records read back, means and differences with 95% intervals (Student t,
Welch's t, or a percentile bootstrap), the markdown tables, the PNGs and `report`, which writes
--out/table.md and --out/results.json from the run records alone (`evidence --report_only`)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

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
    fresh: str = "max"  # replay.fresh_priority: a new round's priority (the largest seen, or its own |δ|)

    @property
    def name(self) -> str:
        replay = f"per{self.alpha:g}{'_fresh' if self.fresh == 'delta' else ''}" if self.prioritized else "uniform"
        if self.part in ("per", "per_tiny"):
            return f"K{self.updates}_cap{self.buffer_rounds}_{replay}"
        if self.part == "reuse":
            return f"K{self.updates}_R{self.reset_every}_cap{self.buffer_rounds}"
        return f"{self.algorithm}_lr{self.learning_rate:g}"


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


def reached_at(run: dict, target: float) -> dict:
    """`run` with its rounds to `target` read from its evaluated rounds (the first at or above it; None
    when none is): for runs that do not stop at a target (part per_tiny), whose curve has one point every
    eval.every rounds, so the rounds are that cadence's multiples."""
    first = next((int(i) for i, a in run["curve"] if a >= target), None)
    return {**run, "target": target, "rounds_to_target": first}


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


REPLAYS = (("uniform", "uniform"), ("per0.6", "PER α=0.6"), ("per1", "PER α=1.0"),
           ("per1_fresh", "PER α=1.0, fresh |δ|"))  # name part, title (fresh: replay.fresh_priority = delta)
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
    text = ("| K, buffer | " + " | ".join(t for _, t in REPLAYS) + " | "
            + " | ".join(f"{t[4:]} − uniform" for _, t in REPLAYS[1:]) + " |\n|---|"
            + "---|" * (2 * len(REPLAYS) - 1) + "\n")
    for k, cap in GRID:
        c = [cells.get(f"K{k}_cap{cap}_{r}") for r, _ in REPLAYS]
        diffs = [diff_ci(x["last"], c[0]["last"], boot=boot) if x and c[0] else None for x in c[1:]]
        text += (f"| K={k}, {cap} rounds | "
                 + " | ".join(f"{x['last_mean']:.3f}{_ci(*x['last_ci'], '.3f')}, n={x['n']}" if x else "not run"
                              for x in c) + " | "
                 + " | ".join(f"{d[0]:+.3f}{_ci(d[1], d[2], '+.3f')}" if d else "—" for d in diffs) + " |\n")
    return text


def _eval_every(runs: list[dict]) -> str:
    """The evaluation cadence of the per_tiny runs (their curves' first step), for the table's title."""
    steps = {r["curve"][1][0] - r["curve"][0][0] for r in runs if r["part"] == "per_tiny" and len(r["curve"]) > 1}
    return "/".join(str(s) for s in sorted(steps)) or "?"


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


def plot_per(runs: list[dict], path: Path, part: str = "per", ylabel: str = "accuracy (mean over seeds)") -> None:
    """Mean accuracy at the evaluated rounds (a stopped run keeps its last value) of every cell of
    `part` (per or per_tiny), one panel per (K, buffer)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharey=True)
    for col, k in enumerate((2, 4, 8)):
        for row, cap in enumerate((4, 16)):
            ax = axes[row, col]
            for replay, _ in REPLAYS:
                group = [r for r in runs if r["part"] == part and r["name"] == f"K{k}_cap{cap}_{replay}"]
                if group:
                    xs = sorted({i for r in group for i, _ in r["curve"]})
                    ax.plot(xs, [np.mean([accuracy_at(r, x) for r in group]) for x in xs],
                            marker="." if part == "per_tiny" else None, label=f"{replay} (n={len(group)})")
            ax.set_title(f"K={k}, buffer {cap} rounds", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7) if ax.lines else None
            ax.set_xlabel("generation round") if row else None
            ax.set_ylabel(ylabel) if not col else None
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


def plot_per_rounds(cells: dict[str, dict], path: Path) -> None:
    """Parts per and per_tiny: rounds to the target per (K, buffer), one line per replay."""
    plot_rounds(cells, {r: [f"K{k}_cap{cap}_{r}" for k, cap in GRID] for r, _ in REPLAYS},
                [f"K{k},{cap}" for k, cap in GRID], "K, buffer rounds", path)


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


def report(out: Path, args, key: str) -> dict:
    """Every table, summary and plot from the run records under `out`/runs; `key` is the held-out
    metric of the table runs (avg@k of their config)."""
    runs = [reached_at(r, args.tiny_target) if r["part"] == "per_tiny" else r for r in load_runs(out)]
    summary = summarize(runs, args.fixed_round, args.boot)
    per, reuse = summary.get("per", {}), summary.get("reuse", {})
    sweep, table = summary.get("table_sweep", {}), summary.get("table", {})
    lrs = tuple(float(x) for x in args.table_lrs.split(","))
    chosen = choose_rates(sweep, lrs)
    text = f"# Evidence tables (written by reval_jax.experiments.evidence from {len(runs)} runs)\n\n"
    text += f"## Prioritized against uniform replay (one-prompt hard level, target {args.target})\n\n"
    text += per_tables(per, args.fixed_round, args.boot)
    text += f"\n## Where reuse stops paying: ReVal rounds to {args.target}\n\n" + reuse_table(reuse)
    text += (f"\n## Baselines at equal generation budgets (configs/tiny.py, {args.table_rounds} rounds)\n\n"
             + table_table(table, sweep, chosen, key))
    if summary.get("per_tiny"):
        text += (f"\n## Prioritized against uniform replay on the demo task (configs/tiny.py, {args.table_rounds} "
                 f"rounds): held-out {key} of the last round\n\n" + per_tiny_table(summary["per_tiny"], args.boot)
                 + f"\n### The same runs: rounds to held-out {key} ≥ {args.tiny_target} (evaluated every "
                 f"{_eval_every(runs)} rounds, so multiples of it; a miss counts as {args.table_rounds + 1}) and "
                 f"{key} after {args.fixed_round} rounds\n\n"
                 + re.sub(r"(?m)^### ", "#### ", per_tables(summary["per_tiny"], args.fixed_round, args.boot)))
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "summary": summary, "chosen_rates": chosen},
                                                 indent=1))
    if per:
        plot_per(runs, out / "per_curves.png")
        plot_per_rounds(per, out / "per_rounds.png")
    if summary.get("per_tiny"):
        plot_per(runs, out / "per_tiny_curves.png", "per_tiny", f"held-out {key} (mean over seeds)")
        plot_per_rounds(summary["per_tiny"], out / "per_tiny_rounds.png")
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
