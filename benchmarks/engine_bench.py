"""Long-tail rollouts: the rollout engine against the static sampler it replaced, same run, same model.

RL responses are long-tailed (Qwen2.5-Math-7B: ~600 tokens on average, a 3,072 cap that some row
always reaches). The static sampler runs every row of a call until the longest one stops; the
engine refills a slot as soon as its row stops. Response lengths are drawn from a log-normal and
given to the engine as per-request `max_new_tokens` (standing in for EOS); the static sampler runs to
the cap and is credited with the same useful tokens (what it would keep if those rows had stopped
there: with EOS it would still run until its longest row stops).

    python benchmarks/engine_bench.py                   # CPU: 1/10 of the paper's lengths
    python benchmarks/engine_bench.py --prompts 128 --mean 600 --cap 3072 --slots 256   # paper scale

Each side runs in its own process (`--side`), alone, `--repeats` times (median); then both are run
again interleaved, side by side in time, so that a loaded machine affects both alike. Figures:
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
    from reval_jax.config import preset
    from reval_jax.rollout.engine import Engine, EngineConfig
    from reval_jax.sampler import SamplingConfig, generate_static

    prompts, lengths = workload(args)
    model = reval_jax.create_model(preset("bench", dtype=args.dtype, param_dtype=args.dtype,
                                          max_position_embeddings=args.prompt_len + args.cap + 64), seed=0)
    N = args.samples
    config = SamplingConfig(max_new_tokens=args.cap, num_samples=N, temperature=1.0,
                            buckets=(args.prompt_len,))
    useful = int(lengths.sum())
    times = []
    for r in range(args.repeats + 1):  # the first call compiles
        t0 = time.perf_counter()
        if args.side == "engine":
            eng = Engine(model, config, EngineConfig(slots=args.slots, page_size=args.page_size,
                                      cache_tokens=args.slots * (args.prompt_len + args.cap) // args.cache_div,
                                      prefill_chunk=args.prompt_len, prefill_rows=args.slots // 4),
                         prompt_bucket=args.prompt_len)
            out = eng.run(prompts, seed=r, prompt_ids=list(range(len(prompts))), limits=lengths.reshape(-1, N))
            got = sum(len(tokens) for o in out for tokens, _, _ in o)
            assert got == useful, (got, useful)
            stats = eng.stats
        else:
            calls, got = 0, 0
            per_call = max(1, args.static_batch // N)
            for i in range(0, len(prompts), per_call):
                out = generate_static(model, prompts[i : i + per_call], config, seed=r)
                jax.block_until_ready(out.response_tokens)
                calls += 1
            stats = {"calls": calls}
        times.append(time.perf_counter() - t0)
    del nnx
    steady = times[1:]
    return {"side": args.side, "first_s": times[0], "median_s": float(np.median(steady)),
            "times": steady, "useful_tokens": useful, "tokens_per_s": useful / float(np.median(steady)),
            "stats": stats, "device": jax.devices()[0].device_kind}


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
    for order, sides in (("alone", [["engine"], ["static"]]), ("side by side", [["engine", "static"]])):
        for group in sides:
            procs = {s: subprocess.Popen(base + ["--side", s], stdout=subprocess.PIPE, text=True) for s in group}
            for s, proc in procs.items():
                out, _ = proc.communicate()
                if proc.returncode:
                    raise SystemExit(f"{s} side failed ({proc.returncode})")
                results[(order, s)] = json.loads(out.strip().splitlines()[-1])
        for s in ("engine", "static"):
            r = results[(order, s)]
            print(f"{order:>12} {s:>6}: first {r['first_s']:.1f} s, median {r['median_s']:.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in r['times'])}) = {r['tokens_per_s']:.0f} useful tokens/s; "
                  f"{r['stats']}")
        ratio = results[(order, "engine")]["tokens_per_s"] / results[(order, "static")]["tokens_per_s"]
        print(f"{order:>12}: engine / static = {ratio:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
