"""How ReVal and GRPO degrade with staleness, and how busy each device group is, sync vs async.

Part 1 (`--part=staleness`): the embedded tiny model (configs/tiny.py, the demo's problems) trained
by ReVal (K = 2 updates per round) and GRPO (K = 1) in async mode at pipeline.max_staleness in
{0, 1, 2, 4, 8}, time-sliced (every round generated right after update w_i = (i−1)K − staleness,
so every round after the first few is exactly `staleness` updates old; 0 is the sync run), over
several seeds. Each run is its own `python -m reval_jax.train` process. Reported: rounds until the
training accuracy, averaged over 3 consecutive rounds, first reaches `--target`; the accuracy over
the last 5 rounds; wall seconds per round (median, first round excluded: it compiles).

Part 2 (`--part=busy`): 8 fake CPU devices; sync (every device generates, then every device trains)
against async on two groups (`--rollout-devices` generate, the rest train, max_staleness 2). The
busy fraction of each side is measured per round by the pipeline's clock (intervals in which the
rollout side generated or the trainer ran updates); medians over rounds 2.. are reported. Fake
devices share this machine's cores, so the two groups compete for the same CPUs: the fractions show
the overlap the schedule allows, not an accelerator's speed-up.

    python benchmarks/async_experiment.py --part=staleness --out=docs/async   # figures in docs/async.md
    python benchmarks/async_experiment.py --part=busy --out=docs/async
    python benchmarks/async_experiment.py --part=staleness --rounds=4 --seeds=0 --staleness=0,2   # a quick look

Run directories go under --work (default /tmp/reval_async_runs); finished runs there, and runs
already recorded in --out/staleness.jsonl, are reused (--rerun to redo them); the tables and per-run
JSON lines go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(workdir: Path, overrides: dict, env_extra: dict | None = None) -> list[dict]:
    """One run of the real command; returns its train records."""
    args = [sys.executable, "-m", "reval_jax.run.train", "--config=configs/tiny.py", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path("/tmp") / "reval_jax_async_experiment_cache"))
    log = workdir.with_suffix(".log")
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        rc = subprocess.run(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"run failed ({rc}): {' '.join(args)}\n{log.read_text()[-3000:]}")
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def rounds_to_target(accuracy: list[float], target: float, window: int = 3) -> int | None:
    for i in range(window, len(accuracy) + 1):
        if statistics.fmean(accuracy[i - window : i]) >= target:
            return i
    return None


def staleness_part(args) -> list[dict]:
    rows = []
    # runs already recorded in --out (e.g. by an earlier sweep whose --work is gone) are kept, not redone
    recorded = {}
    if (Path(args.out) / "staleness.jsonl").exists() and not args.rerun:
        for r in map(json.loads, (Path(args.out) / "staleness.jsonl").read_text().splitlines()):
            recorded[r["algorithm"], r["staleness"], r["seed"], r["rounds"]] = r
    # staleness outermost, in the order given: a partial sweep has every algorithm and seed of the
    # first staleness values
    for staleness in map(int, args.staleness.split(",")):
        for algorithm in args.algorithms.split(","):
            for seed in map(int, args.seeds.split(",")):
                workdir = Path(args.work) / f"{algorithm}_s{staleness}_seed{seed}"
                records = []
                if (workdir / "metrics.jsonl").exists() and not args.rerun:
                    records = [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
                               if r["kind"] == "train"]
                kept = recorded.get((algorithm, staleness, seed, args.rounds))
                if len(records) != args.rounds and kept is not None:
                    # the target may differ from the recording sweep's: recompute from the accuracies
                    rows.append({**kept, "rounds_to_target": rounds_to_target(kept["accuracy"], args.target)})
                    print(f"{workdir.name}: kept from {args.out}/staleness.jsonl", flush=True)
                    _write_rows(args.out, rows)
                    continue
                if len(records) != args.rounds:  # not run, unfinished, or another length: run it
                    if workdir.exists():
                        import shutil

                        shutil.rmtree(workdir)
                    t0 = time.perf_counter()
                    records = train(workdir, {
                        "algorithm": algorithm, "seed": seed, "num_iterations": args.rounds,
                        "pipeline.mode": "async", "pipeline.max_staleness": staleness,
                        "eval.every": 0, "checkpoint.every": args.rounds, "data.prompts_per_iteration": args.prompts,
                    })
                    print(f"{workdir.name}: {time.perf_counter() - t0:.0f} s", flush=True)
                acc = [r["accuracy"] for r in records]
                seconds = [r["generate_s"] + r["update_s"] for r in records[1:]]
                rows.append({
                    "algorithm": algorithm, "staleness": staleness, "seed": seed, "rounds": len(records),
                    "rounds_to_target": rounds_to_target(acc, args.target),
                    "final_accuracy": statistics.fmean(acc[-5:]),
                    "staleness_max": max(r["staleness_max"] for r in records),
                    "round_s": statistics.median(seconds) if seconds else float("nan"),
                    "accuracy": acc,
                })
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "accuracy"}), flush=True)
                _write_rows(args.out, rows)  # after every run: a sweep stopped part-way keeps what it measured
    return rows


def _write_rows(out: str, rows: list[dict]) -> None:
    """The sweep's rows so far, with the recorded ones it kept (an earlier sweep's file is read first)."""
    (Path(out) / "staleness.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def staleness_table(rows: list[dict], target: float) -> str:
    out = [f"| algorithm | staleness | rounds to {target:.2f} (per seed) | mean | accuracy, last 5 rounds "
           "(mean over seeds) | s / round (median) | s to target (rounds × s / round, per seed) |",
           "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["algorithm"], r["staleness"]) for r in rows}, key=lambda k: (k[0] != "reval", k))
    for algorithm, staleness in keys:
        mine = [r for r in rows if (r["algorithm"], r["staleness"]) == (algorithm, staleness)]
        hits = [r["rounds_to_target"] for r in mine]
        reached = [h for h in hits if h is not None]
        per_seed = ", ".join("—" if h is None else str(h) for h in hits)
        mean = f"{statistics.fmean(reached):.1f}" if len(reached) == len(hits) else \
            f"{len(hits) - len(reached)} of {len(hits)} not within {mine[0]['rounds']}"
        to_target = ", ".join("—" if r["rounds_to_target"] is None else f"{r['rounds_to_target'] * r['round_s']:.0f}"
                              for r in mine)
        out.append(f"| {algorithm} | {staleness} | {per_seed} | {mean} | "
                   f"{statistics.fmean(r['final_accuracy'] for r in mine):.3f} | "
                   f"{statistics.median(r['round_s'] for r in mine):.2f} | {to_target} |")
    return "\n".join(out)


def busy_part(args) -> list[dict]:
    devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    common = {"num_iterations": args.rounds, "eval.every": 0, "checkpoint.every": args.rounds,
              "data.prompts_per_iteration": args.prompts}
    n = args.rollout_devices
    runs = {
        "sync, mesh (1,8,1) on all 8": {**common, "mesh": "(1,8,1)"},
        # the trainer's mesh of the async run, without the overlap: what the smaller mesh alone changes
        f"sync, mesh (1,{8 - n},1) on {8 - n} of 8": {**common, "mesh": f"(1,{8 - n},1)"},
        f"async, {n} generate + {8 - n} train (mesh (1,{8 - n},1)), max_staleness 2":
            {**common, "mesh": f"(1,{8 - n},1)", "pipeline.mode": "async", "pipeline.max_staleness": 2,
             "pipeline.rollout_devices": n},
    }
    rows = []
    for name, overrides in runs.items():
        mesh = overrides["mesh"].strip("()").replace(",", "")
        workdir = Path(args.work) / f"busy_{name.split(',')[0]}_{mesh}"
        if workdir.exists():
            import shutil

            shutil.rmtree(workdir)
        t0 = time.perf_counter()
        records = train(workdir, overrides, devices)
        wall = time.perf_counter() - t0
        # medians over rounds 2 .. R-1: the first compiles, the last has no round left to generate
        steady = records[1:-1]
        med = {k: statistics.median(r[k] for r in steady) for k in ("rollout_busy", "train_busy", "rollout_wait_s",
                                                                     "train_wait_s")}
        rows.append({"run": name, "wall_s": wall, "iteration_s": statistics.median(r["iteration_s"] for r in steady),
                     **med, "final_accuracy": statistics.fmean(r["accuracy"] for r in records[-5:])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def busy_table(rows: list[dict]) -> str:
    out = ["| run | s / round | rollout side busy | trainer busy | rollout waits (s/round) | "
           "trainer waits (s/round) | process wall (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['run']} | {r['iteration_s']:.1f} | {r['rollout_busy']:.2f} | {r['train_busy']:.2f} | "
                   f"{r['rollout_wait_s']:.2f} | {r['train_wait_s']:.2f} | {r['wall_s']:.0f} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("staleness", "busy"), required=True)
    p.add_argument("--algorithms", default="reval,grpo")
    p.add_argument("--staleness", default="0,1,2,4,8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--prompts", type=int, default=16, help="prompts per round (configs/tiny.py: 16)")
    p.add_argument("--target", type=float, default=0.6, help="training accuracy, 3-round mean")
    p.add_argument("--rollout-devices", type=int, default=4)
    p.add_argument("--rerun", action="store_true", help="rerun runs whose metrics exist")
    p.add_argument("--out", default="docs/async")
    p.add_argument("--work", default="/tmp/reval_async_runs")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.part == "staleness":
        rows = staleness_part(args)
        print(staleness_table(rows, args.target))
    else:
        rows = busy_part(args)
        (Path(args.out) / "busy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(busy_table(rows))


if __name__ == "__main__":
    main()
