"""The training path's forward + backward against tunix and PyTorch on the same XLA (issue 26, point 2).

Workload: the `bench` preset (Qwen2, V 32000, D 512, F 1408, 8 layers, 8 heads, 4 kv heads; 56.4M
parameters), float32, 16 sequences of 64 prompt + 128 response tokens, random weights (seed 0)
written once as a Hugging Face directory and random tokens (seed 1): every side reads the same
files. Each side computes, jit-compiled (PyTorch: eager), the gradient of

    loss = Σ over response tokens of log π(token | earlier tokens)

with respect to every parameter:

  reval_jax    `logprobs.sequence_stats(...).logp.sum()` (its default chunk; `--chunk`), the model
               from `reval_jax.load_hf`, `nnx.value_and_grad`, `jax.jit`.
  tunix        tunix's own RL log-prob path (`tunix.rl.common.compute_per_token_logps`: the model's
               logits, the completion positions, `selective_log_softmax`) with `stop_gradient=False`,
               the model from `tunix.models.qwen2.params.create_model_from_safe_tensors`, `nnx.jit`.
  transformers `AutoModelForCausalLM` (sdpa), full logits, float32 `log_softmax` + `gather` on the
               response positions, `loss.backward()`.

Each side runs alone in its own process (`--side=NAME`), sides alternate for `--rounds` rounds;
every process prints its first loss (checked against the first side's: relative 1e-4), its
per-step wall and CPU seconds and a `BENCH_RESULT {json}` line; the parent prints each side's
median over processes of its median tokens/s, and every ratio to tunix (by medians and per round).
The `matmul` side measures XLA's float32 matmul GFLOP/s on this machine (the roofline): the
unembedding's [3072, 512] x [512, 32000] and the MLP's [3072, 512] x [512, 1408].

    python benchmarks/train_path_bench.py --tunix-python /work/.venv-tunix/bin/python --rounds 3

tunix (`google-tunix`) is not a dependency: give it its own virtual environment
(`python3 -m venv /work/.venv-tunix && /work/.venv-tunix/bin/pip install -r requirements.txt
google-tunix`). Without `--tunix-python` the tunix side is skipped, saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("reval_jax", "tunix", "transformers", "baseline")


# ----------------------------------------------------------------------------- shared


def load_inputs(data: Path) -> dict:
    with np.load(data / "batch.npz") as f:
        return {k: f[k] for k in f.files}


def timed_loop(step, steps: int, warmup: int) -> dict:
    """First call (compilation included), `warmup` untimed calls, then `steps` timed ones.
    `step()` returns the loss (a float: it waits for the gradients)."""
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"loss": loss, "first_s": first, "wall": wall, "cpu": cpu}


def jax_versions() -> str:
    import jax

    return (f"jax {jax.__version__} ({jax.devices()[0].platform}), default_matmul_precision="
            f"{jax.config.jax_default_matmul_precision}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


# ----------------------------------------------------------------------------- the sides


def prepare(args, data: Path) -> None:
    """The policy (seed 0) as a Hugging Face directory and the tokens (seed 1) as batch.npz."""
    sys.path.insert(0, str(ROOT))
    import reval_jax
    from reval_jax.model.config import preset

    model = reval_jax.create_model(preset("bench"), seed=0)
    reval_jax.save_hf(model, None, data / "policy")
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, model.cfg.vocab_size, (args.batch, args.prompt_len + args.response_len))
    np.savez(data / "batch.npz", tokens=tokens.astype(np.int32), prompt_len=args.prompt_len)


def reval_jax_step(args, data: Path):
    sys.path.insert(0, args.reval_root or str(ROOT))
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import reval_jax
    from reval_jax.objective import logprobs

    model, _ = reval_jax.load_hf(data / "policy", load_tokenizer=False)
    inputs = load_inputs(data)
    tokens = jnp.asarray(inputs["tokens"])
    B, T = tokens.shape
    P = int(inputs["prompt_len"])
    mask = jnp.ones((B, T), jnp.int32)
    response = jnp.asarray(np.arange(T)[None].repeat(B, 0) >= P)
    s1 = jnp.full((B,), P - 1, jnp.int32)
    graphdef, params = nnx.split(model)

    def loss_fn(p):
        stats = logprobs.sequence_stats(nnx.merge(graphdef, p), tokens, mask, response, s1, chunk=args.chunk)
        return stats.logp.sum()

    grad = jax.jit(jax.value_and_grad(loss_fn))

    def step():
        loss, g = grad(params)
        jax.block_until_ready(g)
        return float(loss)

    return step, (f"{jax_versions()}, reval_jax from {Path(reval_jax.__file__).parent}, attention "
                  f"{model.cfg.attention}, chunk {args.chunk}")


def tunix_step(args, data: Path):
    from importlib.metadata import version

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tunix.models.qwen2 import model as tunix_model
    from tunix.models.qwen2 import params as tunix_params
    from tunix.rl import common

    hf = json.loads((data / "policy" / "config.json").read_text())
    theta = hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"]
    cfg = tunix_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(theta), norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=bool(hf.get("tie_word_embeddings", False)))
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = tunix_params.create_model_from_safe_tensors(str(data / "policy"), cfg, mesh=mesh, dtype=jnp.float32)
    inputs = load_inputs(data)
    P = int(inputs["prompt_len"])
    prompt, completion = jnp.asarray(inputs["tokens"][:, :P]), jnp.asarray(inputs["tokens"][:, P:])
    completion_mask = jnp.ones(completion.shape, jnp.int32)

    def loss_fn(m):
        logps = common.compute_per_token_logps(m, prompt, completion, pad_id=-1, eos_id=-1,
                                               completion_mask=completion_mask, stop_gradient=False)
        return logps.sum()

    grad = nnx.jit(nnx.value_and_grad(loss_fn))

    def step():
        loss, g = grad(model)
        jax.block_until_ready(g)
        return float(loss)

    return step, f"{jax_versions()}, google-tunix {version('google-tunix')}"


def transformers_step(args, data: Path):
    import torch
    import transformers

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        data / "policy", dtype=torch.float32, attn_implementation="sdpa")
    inputs = load_inputs(data)
    tokens = torch.from_numpy(inputs["tokens"]).long()
    P = int(inputs["prompt_len"])

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(tokens).logits[:, P - 1:-1].float()  # the positions that predict the response
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, P:, None])
        loss = logp.sum()
        loss.backward()
        return float(loss)

    return step, (f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
                  f"transformers {transformers.__version__}")


def matmul_side(args) -> dict:
    """XLA's float32 GFLOP/s on the unembedding's and the MLP's matmul shapes (medians of 7)."""
    import jax
    import jax.numpy as jnp

    rows = args.batch * (args.prompt_len + args.response_len)
    out = {}
    for name, (m, k, n) in {"unembed": (rows, 512, 32000), "mlp": (rows, 512, 1408)}.items():
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        f = jax.jit(lambda a, b: a @ b)
        f(a, b).block_until_ready()
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            times.append(time.perf_counter() - t0)
        out[name] = 2 * m * k * n / statistics.median(times) / 1e9
        print(f"matmul {name} [{m}, {k}] x [{k}, {n}]: {out[name]:.1f} GFLOP/s", flush=True)
    return {"side": "matmul", "gflops": out, "versions": jax_versions()}


def run_side(args, data: Path) -> dict:
    if args.side == "matmul":
        return matmul_side(args)
    make = {"reval_jax": reval_jax_step, "baseline": reval_jax_step, "tunix": tunix_step,
            "transformers": transformers_step}[args.side]
    load0 = os.getloadavg()[0]
    step, versions = make(args, data)
    r = timed_loop(step, args.steps, args.warmup)
    tokens = args.batch * (args.prompt_len + args.response_len)
    med = statistics.median(r["wall"])
    print(f"{args.side}: {versions}")
    print(f"{args.side}: loss {r['loss']:.6f}, first call {r['first_s']:.1f} s, steps "
          + " ".join(f"{w:.2f}" for w in r["wall"]) + " s (CPU " + " ".join(f"{c:.2f}" for c in r["cpu"])
          + f"), median {med:.3f} s = {tokens / med:.1f} tokens/s; load {load0:.2f} -> {os.getloadavg()[0]:.2f}",
          flush=True)
    return {"side": args.side, "loss": r["loss"], "median_s": med, "tokens_per_s": tokens / med,
            "cpu_median_s": statistics.median(r["cpu"]), "first_s": r["first_s"], "versions": versions}


# ----------------------------------------------------------------------------- the parent


def launch(args, side: str, data: Path) -> dict:
    python = args.tunix_python if side == "tunix" else sys.executable
    argv = [python, str(Path(__file__).resolve()), f"--side={side}", f"--data-dir={data}",
            f"--steps={args.steps}", f"--warmup={args.warmup}", f"--chunk={args.chunk}",
            f"--batch={args.batch}", f"--prompt-len={args.prompt_len}", f"--response-len={args.response_len}"]
    root = args.baseline_root if side == "baseline" else str(ROOT)
    argv.append(f"--reval-root={root}")
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if not line.startswith("BENCH_RESULT"):
            print("  " + line)
    if out.returncode:
        print(out.stderr[-3000:])
        raise SystemExit(f"side {side} failed ({out.returncode})")
    return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("BENCH_RESULT"))[13:])


def parent(args) -> None:
    sides = [s for s in args.sides if (s != "tunix" or args.tunix_python) and (s != "baseline" or args.baseline_root)]
    if "tunix" in args.sides and not args.tunix_python:
        print("tunix: skipped (pass --tunix-python, a python with google-tunix installed)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--side=prepare", f"--data-dir={data}",
                        f"--batch={args.batch}", f"--prompt-len={args.prompt_len}",
                        f"--response-len={args.response_len}"], check=True)
        roofline = launch(args, "matmul", data)
        results: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(args.rounds):
            for side in sides:
                print(f"round {r + 1}, {side} (load {os.getloadavg()[0]:.2f}):", flush=True)
                results[side].append(launch(args, side, data))
    report(args, sides, results, roofline)


def report(args, sides, results, roofline) -> None:
    first = results[sides[0]][0]["loss"]
    for side in sides:
        for res in results[side]:
            if abs(res["loss"] - first) > 1e-4 * abs(first):
                raise SystemExit(f"{side}'s loss {res['loss']} differs from {sides[0]}'s {first}")
    tokens = args.batch * (args.prompt_len + args.response_len)
    flops = 3 * 2 * tokens * 40.0e6  # fwd + bwd of the 40.0M matmul parameters (no embedding table, no attention)
    print(f"\nloss agrees on every side (first: {first:.4f}); roofline "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in roofline["gflops"].items()))
    base = "tunix" if "tunix" in sides else sides[0]
    base_tps = statistics.median(x["tokens_per_s"] for x in results[base])
    base_cpu = statistics.median(x["cpu_median_s"] for x in results[base])
    print(f"| side | tokens/s (median of {args.rounds} processes) | s/step | CPU s/step | model GFLOP/s "
          f"| ratio to {base} (medians) | per round | ratio by CPU s/step |")
    print("|---|---|---|---|---|---|---|---|")
    for side in sides:
        tps = statistics.median(x["tokens_per_s"] for x in results[side])
        s = tokens / tps
        cpu = statistics.median(x["cpu_median_s"] for x in results[side])
        rounds = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results[side], results[base], strict=True)]
        print(f"| {side} | {tps:.1f} | {s:.3f} | {cpu:.2f} | {flops / s / 1e9:.0f} | {tps / base_tps:.2f}x "
              f"| {' '.join(f'{x:.2f}x' for x in rounds)} | {base_cpu / cpu:.2f}x |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", choices=["prepare", "matmul", *SIDES], help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES,
                   help="baseline runs only with --baseline-root, tunix only with --tunix-python")
    p.add_argument("--tunix-python", default="", help="a python with google-tunix installed")
    p.add_argument("--baseline-root", default="",
                   help="a directory holding another reval_jax package (`git archive HEAD reval_jax | tar -x -C "
                        "DIR`): adds the side 'baseline', our path from that code")
    p.add_argument("--reval-root", default="", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--chunk", type=int, default=512, help="reval_jax's sequence_stats chunk (positions per row)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=128)
    args = p.parse_args()
    if args.side == "prepare":
        prepare(args, Path(args.data_dir))
    elif args.side:
        print("BENCH_RESULT " + json.dumps(run_side(args, Path(args.data_dir))), flush=True)
    else:
        parent(args)


if __name__ == "__main__":
    main()
