"""Sampler throughput: reval_jax `generate` (the rollout engine) against `transformers` generate and
tunix's `Sampler`, on the same weights and the same prompts, each side in its own process.

CPU (default): the `bench` preset (Qwen2 architecture, V 32000, D 512, F 1408, 8 layers, 8 heads,
4 kv heads, float32, random weights written once by `transformers` and loaded by every side), 16
prompts of 64 tokens, 128 new tokens each, no stop token on any side, so every side generates every
token. Two decoding modes:
  greedy  argmax on every side (the same work everywhere; the sides' tokens are compared as a check
          that they run the same model: `agree` is the mean length of the prefix a row shares with
          reval_jax's, out of 128, float32 rounding may part them at a near tie);
  sample  temperature 1.0. transformers: do_sample, top_k 0; reval_jax: categorical over the full
          vocabulary; tunix has no plain-temperature mode: top_p = 1.0, which sorts the vocabulary
          every step (its cost, reported as is).

Each side runs in a subprocess (`--side`): it loads the weights, makes one call (compile and
warm-up), reports READY and waits; then it repeats the call for `--window` seconds (at least
`--repeats` calls) and reports the median. First every side alone, one after another; then
reval_jax with each other side at once, both released by the same GO, so that they share the
machine over the whole window:

    python benchmarks/sampler_bench.py                         # figures in docs/bench_sampler.md
    python benchmarks/sampler_bench.py --tunix-python /work/.venv-tunix/bin/python

tunix (`pip install google-tunix`) is not a dependency of this project: give it its own virtual
environment (`python -m venv /work/.venv-tunix && /work/.venv-tunix/bin/pip install -r
requirements.txt google-tunix`) and pass its python; without it the tunix side is skipped, saying so.

GPU (issue #12 point 7): the DeepSeek-R1-Distill-Qwen-1.5B shapes, random weights in bfloat16, the
engine with 256 slots, prompts of 128 tokens, 1,024 new tokens; tokens/s and the fraction of the
HBM-bandwidth bound (bytes of weights + filled KV pages read per decode step / HBM bandwidth):

    python benchmarks/sampler_bench.py --gpu [--bandwidth 4.8e12]   # H200; 3.35e12 for an H100 SXM
    python benchmarks/sampler_bench.py --gpu --tiny-smoke           # the same code path, tiny, on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled
PAD = 0  # prompts are drawn from 1..V-1; no side stops on any token


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    return np.random.RandomState(seed).randint(1, vocab, (batch, length)).tolist()


# ----------------------------------------------------------------------------- one side per process


def reval_jax_call(args, weights: str, prompts):
    """A callable running one `generate` call; returns the response tokens [B, A]."""
    import jax

    import reval_jax
    from reval_jax.rollout.sampler import SamplingConfig, generate, generate_static

    model, _ = reval_jax.load_hf(weights, load_tokenizer=False)
    config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, greedy=args.mode == "greedy",
                            buckets=(args.prompt_len,), pad_id=PAD)
    fn = generate_static if args.side == "static" else generate
    seed = iter(range(1 << 30))

    def call():
        out = fn(model, prompts, config, seed=next(seed))
        jax.block_until_ready(out.response_tokens)
        assert int(np.asarray(out.response_length).sum()) == len(prompts) * args.new_tokens
        return np.asarray(out.response_tokens)

    return call, f"jax {jax.__version__} ({jax.devices()[0].platform})"


def floor_call(args, weights: str, prompts):
    """The decode steps' matrix products alone, the least any sampler of this model computes per
    token: A steps of 16 rows through the embedding, every layer's q/k/v/o projections and MLP
    (per-layer weights, no attention: the o projection takes q), the final norm, the unembedding and
    an argmax. No prefill, no KV cache, no sampling state. Its time per call bounds every side's
    from below on this machine."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import reval_jax
    from reval_jax.model.decoder import _qkv, rms_norm

    model, _ = reval_jax.load_hf(weights, load_tokenizer=False)
    cfg, A = model.cfg, args.new_tokens
    stacked = model.layer_params()
    layers = [{k: v[i] for k, v in stacked.items()} for i in range(cfg.num_layers)]  # sliced once, outside
    graphdef, state = nnx.split(model)

    @jax.jit
    def steps(state, layers, first):
        m = nnx.merge(graphdef, state)

        def step(i, carry):
            tok, out, kv = carry
            x = m.embed_tokens(tok[:, None])  # [B, 1, D]
            for p in layers:
                h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
                q, k, v = _qkv(h, p, cfg)
                kv = kv + k + v  # k and v are kept (a cache write would keep them), not dead code
                x = x + jnp.einsum("BTNH,NHD->BTD", q, p["o_proj"])
                h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
                x = x + jnp.einsum("BTF,FD->BTD", jax.nn.silu(h @ p["gate_proj"]) * (h @ p["up_proj"]), p["down_proj"])
            logits = m.unembed(rms_norm(x, m.final_norm[...], cfg.rms_norm_eps)[:, 0])
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            return tok, out.at[:, i].set(tok), kv

        B = first.shape[0]
        kv = jnp.zeros((B, 1, cfg.num_kv_heads, cfg.head_dim), jnp.dtype(cfg.dtype))
        _, out, kv = jax.lax.fori_loop(0, A, step, (first, jnp.zeros((B, A), jnp.int32), kv))
        return out, kv

    first = jnp.asarray([p[-1] for p in prompts], jnp.int32)

    def call():
        return np.asarray(jax.block_until_ready(steps(state, layers, first))[0])

    return call, f"jax {jax.__version__} ({jax.devices()[0].platform})"


def transformers_call(args, weights: str, prompts):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).eval()
    ids = torch.tensor(prompts, dtype=torch.long)
    A = args.new_tokens
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=A, min_new_tokens=A, pad_token_id=PAD,
                  eos_token_id=None)
    kwargs.update(do_sample=False) if args.mode == "greedy" else kwargs.update(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    seed = iter(range(1 << 30))

    def call():
        torch.manual_seed(next(seed))
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        assert out.shape == (len(prompts), ids.shape[1] + A), out.shape
        return out[:, ids.shape[1]:].numpy()

    return call, (f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
                  f"transformers {transformers.__version__}")


class _IdTokenizer:
    """tunix's tokenizer protocol over token ids written as text ("5 17 3"): the prompts are ids."""

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return -1

    def pad_id(self) -> int:
        return PAD


def tunix_call(args, weights: str, prompts):
    from importlib.metadata import version

    import jax
    import jax.numpy as jnp
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.qwen2 import model as tunix_model
    from tunix.models.qwen2 import params as tunix_params

    hf = json.loads((Path(weights) / "config.json").read_text())
    theta = hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"]  # transformers 5 writes the latter
    cfg = tunix_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(theta), norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=bool(hf.get("tie_word_embeddings", False)))
    auto = (jax.sharding.AxisType.Auto,) * 2  # tunix's models name these axes; one device
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=auto)
    model = tunix_params.create_model_from_safe_tensors(weights, cfg, mesh=mesh, dtype=jnp.float32)
    P, A = args.prompt_len, args.new_tokens
    sampler = tunix_sampler.Sampler(model, _IdTokenizer(), tunix_sampler.CacheConfig(
        cache_size=P + A, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
    text = [" ".join(map(str, p)) for p in prompts]
    mode = {} if args.mode == "greedy" else dict(temperature=1.0, top_p=1.0, top_k=None)
    seed = iter(range(1 << 30))

    def call():
        out = sampler(text, max_generation_steps=A, max_prompt_length=P, eos_tokens=[-1], seed=next(seed), **mode)
        tokens = np.stack([np.asarray(t) for t in out.tokens])
        assert tokens.shape == (len(prompts), A), tokens.shape
        return tokens

    return call, f"jax {jax.__version__}, google-tunix {version('google-tunix')}"


def run_side(args) -> None:
    """The `--side` subprocess: warm up, READY, wait for GO, repeat for the window, print JSON."""
    make = {"reval_jax": reval_jax_call, "static": reval_jax_call, "transformers": transformers_call,
            "tunix": tunix_call, "floor": floor_call}[args.side]
    hf = json.loads((Path(args.weights) / "config.json").read_text())
    prompts = prompts_for(args.batch, args.prompt_len, hf["vocab_size"])
    call, versions = make(args, args.weights, prompts)
    t0 = time.perf_counter()
    tokens = call()
    first = time.perf_counter() - t0
    print("READY", flush=True)
    sys.stdin.readline()
    times, start = [], time.perf_counter()
    while len(times) < args.repeats or time.perf_counter() - start < args.window:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"side": args.side, "versions": versions, "first_s": first, "times": times,
                      "median_s": float(np.median(times)), "tokens": tokens.tolist()}), flush=True)


# ----------------------------------------------------------------------------- the parent


def _busy() -> float:
    """CPU seconds the whole machine has been busy (/proc/stat, Linux)."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def write_weights(path: str, seed: int = 0) -> None:
    """The bench preset's random weights, as a `transformers` Qwen2 checkpoint every side reads."""
    import torch
    import transformers

    from reval_jax.model.config import preset, to_hf_config

    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**to_hf_config(preset("bench")))).eval()
    hf.save_pretrained(path, safe_serialization=True)


def run_group(args, sides: list[str], weights: str) -> dict[str, dict]:
    """Starts one process per side, releases them together once all are warm, returns their JSON."""
    procs = {}
    for side in sides:
        python = args.tunix_python if side == "tunix" else sys.executable
        cmd = [python, __file__, "--side", side, "--weights", weights, "--mode", args.mode,
               "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--window", str(args.window)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs[side] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    for side, proc in procs.items():
        line = proc.stdout.readline()
        if line.strip() != "READY":
            proc.wait()
            raise SystemExit(f"the {side} side failed before its first call (exit {proc.returncode})")
    start, busy = time.perf_counter(), _busy()
    for proc in procs.values():
        proc.stdin.write("GO\n")
        proc.stdin.flush()
    results = {}
    for side, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
        results[side] = json.loads(out.strip().splitlines()[-1])
    cores = (_busy() - busy) / (time.perf_counter() - start)  # average cores busy meanwhile
    for r in results.values():
        r["machine_busy_cores"] = cores
    return results


def agreed_prefix(a: np.ndarray, b: np.ndarray) -> float:
    """Mean, over rows, of the number of leading tokens two [B, A] greedy outputs share."""
    differ = np.asarray(a) != np.asarray(b)
    return float(np.where(differ.any(1), differ.argmax(1), differ.shape[1]).mean())


def cpu_bench(args) -> None:
    sides = [s for s in args.sides if s != "tunix" or args.tunix_python]
    floor = "floor" in sides
    sides = [s for s in sides if s != "floor"]  # measured alone only: it is a bound, not a side
    if "tunix" in args.sides and not args.tunix_python:
        print("tunix: skipped (pass --tunix-python, a python with google-tunix installed)")
    tokens = args.batch * args.new_tokens
    with tempfile.TemporaryDirectory() as weights:
        write_weights(weights)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
              f"workload: bench preset, {args.batch} prompts x {args.prompt_len} tokens, {args.new_tokens} "
              f"new tokens ({tokens} tokens per call), mode {args.mode}, window {args.window:.0f} s, "
              f">= {args.repeats} calls")
        alone = {s: run_group(args, [s], weights)[s] for s in sides + ["floor"] * floor}
        together = {other: run_group(args, ["reval_jax", other], weights)
                    for other in sides if other != "reval_jax"}
    ref = np.asarray(alone["reval_jax"]["tokens"])
    for s, r in alone.items():
        agree = f"agree {agreed_prefix(ref, r['tokens']):5.1f}/{args.new_tokens}" \
            if args.mode == "greedy" and s != "floor" else ""
        print(f"{'alone':>13} {s:>12}: first call {r['first_s']:6.2f} s, median {r['median_s']:6.3f} s of "
              f"{len(r['times'])} = {tokens / r['median_s']:7.1f} tokens/s (machine busy "
              f"{r['machine_busy_cores']:.2f} cores) {agree} [{r['versions']}]")
    for other, group in together.items():
        ours, theirs = group["reval_jax"], group[other]
        print(f"{'side by side':>13} {'reval_jax':>12}: median {ours['median_s']:6.3f} s of {len(ours['times'])} = "
              f"{tokens / ours['median_s']:7.1f} tokens/s | {other}: median {theirs['median_s']:6.3f} s of "
              f"{len(theirs['times'])} = {tokens / theirs['median_s']:7.1f} tokens/s (machine busy "
              f"{ours['machine_busy_cores']:.2f} cores)")
    if floor:
        f, ours = alone["floor"]["median_s"], alone["reval_jax"]["median_s"]
        print(f"floor: the decode steps' matrix products alone take {f:.3f} s per call "
              f"({1e3 * f / args.new_tokens:.1f} ms per step); reval_jax spends {ours - f:.3f} s more "
              f"({ours / f:.2f}x the floor)")
        for other in together:
            print(f"  a sampler at the floor would be at {alone[other]['median_s'] / f:.2f}x {other} (alone)")
    for other in together:
        print(f"reval_jax / {other}: alone {alone[other]['median_s'] / alone['reval_jax']['median_s']:.2f}x, "
              f"side by side {together[other][other]['median_s'] / together[other]['reval_jax']['median_s']:.2f}x "
              "(target >= 1.5x)")


# ----------------------------------------------------------------------------- GPU


def gpu_bench(args) -> None:
    import jax

    import reval_jax
    from reval_jax.model.config import preset
    from reval_jax.rollout.engine import Engine, EngineConfig
    from reval_jax.rollout.sampler import SamplingConfig

    cfg = preset("deepseek-r1-distill-qwen-1.5b", param_dtype="bfloat16", dtype="bfloat16")
    slots, A, P = args.gpu_slots, args.gpu_new_tokens, args.gpu_prompt_len
    if args.tiny_smoke:
        cfg = cfg.replace(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=32)
        slots, A, P = 8, 16, 16
    model = reval_jax.create_model(cfg, seed=0)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"HBM bandwidth {args.bandwidth:.3g} B/s{'; TINY SMOKE RUN, not a measurement' if args.tiny_smoke else ''}")
    print(f"model: {cfg.num_params() / 1e9:.3f}B params, bfloat16, random weights; {slots} slots, prompts of "
          f"{P} tokens, {A} new tokens each, temperature 1.0, no stop tokens")
    prompts = prompts_for(slots, P, cfg.vocab_size)
    config = SamplingConfig(max_new_tokens=A, temperature=1.0, buckets=(P,))
    S = 16
    best = None
    for r in range(args.repeats + 1):  # the first call compiles
        engine = Engine(model, config, EngineConfig(slots=slots, page_size=S, prefill_rows=min(slots, 64)),
                        prompt_bucket=P)
        t0 = time.perf_counter()
        out = engine.run(prompts, seed=r, prompt_ids=list(range(slots)), limits=np.full(slots, A))
        seconds = time.perf_counter() - t0
        assert sum(len(t) for o in out for t, _, _ in o) == slots * A
        if r and (best is None or seconds < best[0]):
            best = (seconds, dict(engine.stats))
        print(f"call {r}: {seconds:.2f} s {engine.stats}")
    seconds, stats = best
    step_s = stats["decode_s"] / (A - 1)  # a_1 comes from the prefill; the loop runs A - 1 steps
    itemsize = 2
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # B rows gathered, not read
    weight_bytes = (cfg.num_params() - embed) * itemsize
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize  # k and v of one position
    kv_bytes = slots * per_token * S * np.ceil((P + A / 2) / S)  # the filled pages, on average over the steps
    bound = (weight_bytes + kv_bytes) / args.bandwidth
    print(f"end to end {slots * A / seconds:.0f} tokens/s ({seconds:.2f} s: admit {stats['admit_s']:.2f} s, "
          f"decode {stats['decode_s']:.2f} s) | decode {slots * (A - 1) / stats['decode_s']:.0f} tokens/s, "
          f"{1e3 * step_s:.3f} ms/step | bytes/step {weight_bytes / 1e6:.1f} MB weights + {kv_bytes / 1e6:.1f} MB "
          f"KV pages | bandwidth bound {1e3 * bound:.3f} ms/step = {bound / step_s:.0%} of it reached (target >= 60%)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=["reval_jax", "static", "transformers", "tunix", "floor"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--sides", nargs="+", default=["reval_jax", "transformers", "tunix"],
                   help="sides to run (also: static, the sampler the engine replaced; floor, the decode "
                        "steps' matrix products alone, a lower bound measured alone)")
    p.add_argument("--tunix-python", default="", help="a python with google-tunix installed")
    p.add_argument("--mode", choices=["greedy", "sample"], default="greedy")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="at least this many timed calls per side")
    p.add_argument("--window", type=float, default=60.0, help="and calls for at least this many seconds")
    p.add_argument("--gpu", action="store_true", help="the 1.5B-shaped bfloat16 engine benchmark")
    p.add_argument("--tiny-smoke", action="store_true", help="with --gpu: tiny config, runs on CPU")
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="HBM bytes/s (H100 SXM 3.35e12, H200 4.8e12)")
    p.add_argument("--gpu-slots", type=int, default=256)
    p.add_argument("--gpu-new-tokens", type=int, default=1024)
    p.add_argument("--gpu-prompt-len", type=int, default=128)
    args = p.parse_args()
    if args.side:
        run_side(args)
    elif args.gpu:
        gpu_bench(args)
    else:
        cpu_bench(args)


if __name__ == "__main__":
    main()
