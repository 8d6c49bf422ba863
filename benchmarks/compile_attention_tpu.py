"""Compiles (never runs) the model's forward + backward with splash attention for a TPU that is not
here: a deviceless topology from libtpu, abstract inputs, the compiler's memory analysis per device.

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu /work/.venv-tpu/bin/python \
        benchmarks/compile_attention_tpu.py --preset=qwen2.5-math-7b --topology=v5p:2x2x1 \
        --length=4096 --implementations=splash,chunked,einsum

JAX_PLATFORMS=cpu keeps the default backend on the CPU (there is no TPU to attach to); libtpu is
loaded only to describe the topology and to compile for it. ALLOW_MULTIPLE_LIBTPU_LOAD=1 skips
libtpu's one-process lockfile when another compile holds it. Not a test: CI has no libtpu.
The loss is Σ h² over the final hidden states (no [B, T, V] logits), so the figures are the layers'.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from reval_jax.model.config import preset
from reval_jax.model.decoder import Qwen2
from reval_jax.parallel.sharding import logical_to_spec, make_mesh, state_shardings


def compile_one(cfg, mesh, batch: int, length: int):
    """Compiled value_and_grad of Σ h² w.r.t. the parameters, on abstract sharded inputs."""
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), mesh=mesh))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    row = NamedSharding(mesh, logical_to_spec(("act_batch", None), (batch, length), mesh))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=row)  # [B, T]
    segments = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=row)  # [B, T], packed rows

    def loss(state, tokens, segments):
        model = nnx.merge(graphdef, state)
        h, _ = model.hidden_states(tokens, segment_ids=segments, mask=segments != 0)  # [B, T, D]
        return jnp.sum(jnp.square(h.astype(jnp.float32)))

    out = (NamedSharding(mesh, PartitionSpec()), shardings)  # gradients sharded like the parameters
    return jax.jit(jax.value_and_grad(loss), out_shardings=out).lower(state, tokens, segments).compile()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2.5-math-7b")
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch_per_device", type=int, default=1)
    parser.add_argument("--implementations", default="splash,chunked,einsum")
    parser.add_argument("--remat", default="full")
    args = parser.parse_args()

    topo = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
    devices = topo.devices
    mesh = make_mesh((1, len(devices), 1), devices=devices)  # FSDP over every chip
    batch = args.batch_per_device * len(devices)
    N = preset(args.preset).num_heads
    scores = args.batch_per_device * N * args.length**2 * 4  # one float32 [B, N, T, S] per device
    print(f"{args.topology}: {len(devices)} x {devices[0].device_kind}; {args.preset} bf16 remat={args.remat}, "
          f"B={batch} T={args.length}; one layer's f32 scores per device {scores / 2**30:.2f} GiB")
    for impl in args.implementations.split(","):
        cfg = preset(args.preset, dtype="bfloat16", remat=args.remat, attention=impl)
        start = time.time()
        try:
            mem = compile_one(cfg, mesh, batch, args.length).memory_analysis()
        except Exception as e:  # report and go on: one failure should not hide the others
            print(f"  {impl:8s} FAILED after {time.time() - start:.0f}s: {type(e).__name__}: {str(e)[:400]}")
            continue
        print(f"  {impl:8s} compiled in {time.time() - start:5.1f}s  per device: "
              f"temp {mem.temp_size_in_bytes / 2**30:6.2f} GiB  args {mem.argument_size_in_bytes / 2**30:6.2f} GiB  "
              f"out {mem.output_size_in_bytes / 2**30:6.2f} GiB")


if __name__ == "__main__":
    main()
