"""LoRA on two device groups: what one weight push costs, merged weights against adapters only.

A LoRA run whose rollouts run on a device group of their own (async, `pipeline.rollout_devices`)
pushes the policy after updates. Two ways (issue #28, point 3):
  merged    `rollout.layout.to_rollout`: W + s·A·B computed where the master lives, then every weight
            moved to the rollout group in the rollout dtype (what every other pipeline does);
  adapters  `rollout.layout.AdapterPush`: A, B and s moved (the base once per reference version, i.e.
            once per merge), W + s·A·B computed on the rollout group when it takes the push.
Both give the same rollout copy bit for bit (tests/rollout/test_rollout_layout.py). Measured here on
this machine's 8 host devices (training mesh fsdp over devices 4-7, rollout over 0-3), a model of
`--preset` shapes with adapters of `--rank` on every projection and a bfloat16 base; each figure the
median of `--repeats` pushes, blocked until the rollout copy is ready; the bytes are exact.

    python benchmarks/lora_push_bench.py [--preset=bench] [--rank=16] [--layers=0] [--side=both|merged|adapters]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--layers", type=int, default=0, help="override the preset's layer count (0: keep)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--side", default="both", choices=("both", "merged", "adapters"))
    args = parser.parse_args()

    import jax
    from flax import nnx

    import reval_jax
    from reval_jax.model import lora
    from reval_jax.model.config import preset
    from reval_jax.parallel.sharding import make_mesh
    from reval_jax.rollout.layout import AdapterPush, RolloutLayout, push_bytes, rollout_mesh, to_rollout

    devices = jax.devices()
    train_mesh = make_mesh((1, 4, 1), devices=devices[4:])
    cfg = preset(args.preset, **({"num_layers": args.layers} if args.layers else {}))
    model = reval_jax.create_model(cfg, seed=0, mesh=train_mesh)
    lora.add_adapters(model, lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, base_dtype="bfloat16"))
    graphdef, params = nnx.split(model)
    layout = RolloutLayout(rollout_mesh(devices[:4], 1), "bfloat16")
    push = AdapterPush(layout, graphdef)

    def merged():
        return to_rollout(graphdef, params, layout.mesh, layout.dtype)

    def adapters(version=0):
        return push(params, version).build()

    def seconds(fn) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(nnx.state(fn()))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    sizes = push_bytes(params, layout.dtype)
    print(f"{args.preset} ({cfg.num_layers} layers, rank {args.rank}), bfloat16 base, rollout bfloat16, "
          f"{len(jax.tree.leaves(params))} arrays; jax {jax.__version__} on {devices[0].platform}")
    print(f"bytes per push: merged {sizes['merged'] / 1e6:.1f} MB, adapters {sizes['adapters'] / 1e6:.2f} MB "
          f"(+ the base {sizes['base'] / 1e6:.1f} MB once per merge)")
    for side, fn in (("merged", merged), ("adapters", adapters)):
        if args.side in ("both", side):
            fn()  # compile
            print(f"{side:9s} push: {seconds(fn) * 1e3:8.1f} ms (median of {args.repeats})")
    if args.side in ("both", "adapters"):
        versions = itertools.count(1)  # a new reference version every push: the base moves each time
        after_merge = seconds(lambda: adapters(next(versions)))
        print(f"adapters after a merge (the base moved too): {after_merge * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
