"""Calls per second through the sandbox's pool (reval_jax/env/sandbox.py).

    python benchmarks/sandbox_bench.py --calls=200 --workers=2

Two workloads of N calls each, through `Sandbox.run_many`: a trivial program (`pass`: the cost of the
sandbox itself: interpreter start, namespaces, limits, supervision, clean-up) and a short realistic
snippet of tool-integrated math (fractions, a loop, a print). Prints one JSON line per workload.
"""

from __future__ import annotations

import argparse
import json
import time

from reval_jax.env.sandbox import Sandbox, SandboxConfig

SNIPPET = """\
from fractions import Fraction
import math
total = sum(Fraction(1, k * (k + 1)) for k in range(1, 200))
roots = [x for x in range(-50, 51) if x**3 - 6*x**2 + 11*x - 6 == 0]
print(total, roots, math.comb(30, 12))
"""


def bench(box: Sandbox, code: str, calls: int) -> dict:
    box.run_many([code] * box.config.workers)  # warm: page cache, probe done
    start = time.perf_counter()
    results = box.run_many([code] * calls)
    seconds = time.perf_counter() - start
    assert all(r.kind == "ok" for r in results), [r for r in results if r.kind != "ok"][:1]
    per_call = sorted(r.seconds for r in results)
    return {"calls": calls, "seconds": round(seconds, 3), "calls_per_s": round(calls / seconds, 1),
            "median_call_s": round(per_call[len(per_call) // 2], 4),
            "p95_call_s": round(per_call[int(0.95 * calls)], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--isolation", default="auto", choices=("auto", "namespaces", "process"))
    args = parser.parse_args()
    with Sandbox(SandboxConfig(workers=args.workers, isolation=args.isolation)) as box:
        for name, code in (("trivial", "pass"), ("snippet", SNIPPET)):
            row = {"workload": name, "isolation": box.isolation, "workers": args.workers}
            print(json.dumps({**row, **bench(box, code, args.calls)}), flush=True)


if __name__ == "__main__":
    main()
