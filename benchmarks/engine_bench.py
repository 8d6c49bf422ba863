"""Long-tail rollouts: the rollout engine against the static sampler it replaced, same run, same model.

RL responses are long-tailed (Qwen2.5-Math-7B: ~600 tokens on average, a 3,072 cap that some row
always reaches). The static sampler runs every row of a call until the longest one stops; the
engine refills a slot as soon as its row stops. Response lengths are drawn from a log-normal and
given to the engine as per-request `max_new_tokens` (standing in for EOS); the static sampler runs to
the cap and is credited with the same useful tokens (what it would keep if those rows had stopped
there: with EOS it would still run until its longest row stops).

    python benchmarks/engine_bench.py                   # CPU: 1/10 of the paper's lengths
    python benchmarks/engine_bench.py --prompts 128 --mean 600 --cap 3072 --slots 256   # paper scale

Each side runs in its own process (`--side`), alone, `--repeats` times (median); then both run
side by side: compiled first, released by one GO, and each calling until the slower side's alone
time has passed (so neither side's timed calls run on a machine the other has left). Figures:
docs/bench_sampler.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled


def workload(args):
    """Prompts [B][P], per-prompt lengths [B·N] (log-normal, mean `args.mean`, capped)."""
    rng = np.random.RandomState(args.seed)
    prompts = rng.randint(1, 32000, (args.prompts, args.prompt_len)).tolist()
    sigma = args.sigma
    mu = np.log(args.mean) - sigma**2 / 2  # E[lognormal] = exp(mu + sigma²/2)
    lengths = np.minimum(np.maximum(rng.lognormal(mu, sigma, args.prompts * args.samples).round(), 1), args.cap)
    return prompts, lengths.astype(np.int32)


def side(args) -> dict:
    import jax
    from flax import nnx

    import reval_jax
    from reval_jax.model.config import preset
    from reval_jax.rollout.engine import Engine, EngineConfig
    from reval_jax.rollout.sampler import SamplingConfig, generate_static

    prompts, lengths = workload(args)
    model = reval_jax.create_model(preset("bench", dtype=args.dtype, param_dtype=args.dtype,
                                          max_position_embeddings=args.prompt_len + args.cap + 64), seed=0)
    N = args.samples
    config = SamplingConfig(max_new_tokens=args.cap, num_samples=N, temperature=1.0,
                            buckets=(args.prompt_len,))
    useful = int(lengths.sum())

    def call(r: int) -> dict:
        if args.side == "engine":
            eng = Engine(model, config, EngineConfig(slots=args.slots, page_size=args.page_size,
                                      cache_tokens=args.slots * (args.prompt_len + args.cap) // args.cache_div,
                                      prefill_chunk=args.prompt_len, prefill_rows=args.slots // 4),
                         prompt_bucket=args.prompt_len)
            out = eng.run(prompts, seed=r, prompt_ids=list(range(len(prompts))), limits=lengths.reshape(-1, N))
            got = sum(len(tokens) for o in out for tokens, _, _ in o)
            assert got == useful, (got, useful)
            return eng.stats
        calls = 0
        per_call = max(1, args.static_batch // N)
        for i in range(0, len(prompts), per_call):
            out = generate_static(model, prompts[i : i + per_call], config, seed=r)
            jax.block_until_ready(out.response_tokens)
            calls += 1
        return {"calls": calls}

    t0 = time.perf_counter()
    call(0)  # compiles
    first = time.perf_counter() - t0
    # warm: wait for the parent's GO, so that sides run side by side start their timed calls together
    print("READY", flush=True)
    sys.stdin.readline()
    times, start, r = [], time.perf_counter(), 1
    # at least `repeats` calls, and calls until `window` seconds have passed: a faster side keeps
    # the machine as loaded as the slower one's timed calls find it
    while len(times) < args.repeats or time.perf_counter() - start < args.window:
        t0 = time.perf_counter()
        stats = call(r)
        times.append(time.perf_counter() - t0)
        r += 1
    del nnx
    return {"side": args.side, "first_s": first, "median_s": float(np.median(times)),
            "times": times, "useful_tokens": useful, "tokens_per_s": useful / float(np.median(times)),
            "stats": stats, "device": jax.devices()[0].device_kind}


def run_group(base: list[str], sides: list[str], window: float) -> dict[str, dict]:
    """One process per side; all released by one GO once every side has compiled."""
    procs = {s: subprocess.Popen(base + ["--side", s, "--window", f"{window:.1f}"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for s in sides}
    for s, proc in procs.items():
        if proc.stdout.readline().strip() != "READY":
            proc.wait()
            raise SystemExit(f"{s} side failed before its timed calls ({proc.returncode})")
    for proc in procs.values():
        proc.stdin.write("GO\n")
        proc.stdin.flush()
    results = {}
    for s, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{s} side failed ({proc.returncode})")
        results[s] = json.loads(out.strip().splitlines()[-1])
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=["engine", "static"], default=None, help="run one side (a subprocess)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--mean", type=float, default=60.0, help="mean response length")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma (1.0: ~2%% reach 5x the mean)")
    p.add_argument("--cap", type=int, default=307, help="max_new_tokens")
    p.add_argument("--slots", type=int, default=64, help="engine decode slots")
    p.add_argument("--static-batch", type=int, default=128, help="rows per static sampler call")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--cache-div", type=int, default=2, help="engine cache = slots x (prompt + cap) / this")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=2, help="workload draw (2: mean 60, 2.3%% at the cap)")
    p.add_argument("--window", type=float, default=0.0, help="(a side) keep calling for this many seconds")
    args = p.parse_args()
    if args.side:
        print(json.dumps(side(args)))
        return
    _, lengths = workload(args)
    print(f"workload: {args.prompts} prompts x {args.samples} samples, prompt {args.prompt_len}, lengths "
          f"log-normal mean {lengths.mean():.0f} (target {args.mean}), median {np.median(lengths):.0f}, "
          f"cap {args.cap} reached by {np.mean(lengths >= args.cap):.1%}; {lengths.sum()} useful tokens")
    base = [sys.executable, __file__] + [a for a in sys.argv[1:]]
    results = {}
    for order in ("alone", "side by side"):
        if order == "alone":
            for s in ("engine", "static"):
                results[(order, s)] = run_group(base, [s], 0.0)[s]
        else:
            # both sides keep calling for as long as the slower one's repeats took alone
            window = max(sum(results[("alone", s)]["times"]) for s in ("engine", "static"))
            for s, r in run_group(base, ["engine", "static"], window).items():
                results[(order, s)] = r
        for s in ("engine", "static"):
            r = results[(order, s)]
            print(f"{order:>12} {s:>6}: first {r['first_s']:.1f} s, median {r['median_s']:.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in r['times'])}) = {r['tokens_per_s']:.0f} useful tokens/s; "
                  f"{r['stats']}")
        ratio = results[(order, "engine")]["tokens_per_s"] / results[(order, "static")]["tokens_per_s"]
        print(f"{order:>12}: engine / static = {ratio:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
