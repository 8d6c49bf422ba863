"""Sampler throughput: reval_jax `generate` against `transformers` `generate` on the same weights.

CPU (default): the `bench` preset (Qwen2 architecture, V 32000, D 512, F 1408, 8 layers, 8 heads,
4 kv heads), 16 prompts of 64 tokens, 128 new tokens each, temperature 1.0, no stop tokens on either
side (transformers also gets min_new_tokens) so both generate every token. Reports the first call
(compile + run), the steady-state tokens/s of both and their ratio:

    python benchmarks/sampler_bench.py                      # figures in docs/bench_sampler.md

GPU: the DeepSeek-R1-Distill-Qwen-1.5B shapes with random weights in bfloat16, batch 64 and 256,
1024 new tokens; reports tokens/s and the fraction of the memory-bandwidth bound (weights + KV cache
bytes read per decode step / HBM bandwidth):

    python benchmarks/sampler_bench.py --gpu [--bandwidth 3.35e12]
    python benchmarks/sampler_bench.py --gpu --tiny-smoke   # the same code path, tiny, on CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import reval_jax  # noqa: E402
from reval_jax.config import preset, to_hf_config  # noqa: E402
from reval_jax.sampler import SamplingConfig, _decode, _prefill, generate, pad_prompts  # noqa: E402


def block(tree):
    return jax.block_until_ready(tree)


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by this process) so far: their difference over a
    measurement is the load that other processes put on the machine meanwhile (Linux only)."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    machine = (sum(fields[:8]) - fields[3] - fields[4]) / ticks  # all but idle and iowait
    return machine, time.process_time()


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).tolist()


def ours_runner(model, prompts, config: SamplingConfig):
    """A callable timing one end-to-end `generate` call; returns (seconds, tokens generated)."""
    seed = iter(range(1, 1 << 30))

    def run():
        t0 = time.perf_counter()
        out = block(generate(model, prompts, config, seed=next(seed)))
        return time.perf_counter() - t0, int(np.asarray(out.response_length).sum())

    return run


def ours_split(model, prompts, config: SamplingConfig) -> tuple[float, float]:
    """Seconds of the compiled prefill and of the compiled decode loop, timed on their own."""
    from flax import nnx

    graphdef, params = nnx.split(model)
    P = max(len(p) for p in prompts)
    tokens, mask = pad_prompts(prompts, P, config.pad_id)
    ids = np.arange(len(prompts), dtype=np.int32)
    t0 = time.perf_counter()
    state = block(_prefill(graphdef, params, tokens, mask, ids, np.uint32(0), config=config))
    t1 = time.perf_counter()
    block(_decode(graphdef, params, state, config=config))
    return t1 - t0, time.perf_counter() - t1


def transformers_runner(hf_model, prompts, new_tokens: int):
    """The same for `transformers` generate: sampling at temperature 1, no top-k/top-p, no early
    stop (no eos, min_new_tokens = max_new_tokens)."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                  top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                  eos_token_id=None)
    seed = iter(range(1 << 30))

    def run():
        torch.manual_seed(next(seed))
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf_model.generate(ids, **kwargs)
        return time.perf_counter() - t0, int((out.shape[1] - ids.shape[1]) * ids.shape[0])

    return run


def cpu_bench(args):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    cfg = preset("bench")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**to_hf_config(cfg))).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        model, _ = reval_jax.load_hf(d, load_tokenizer=False)
    prompts = prompts_for(args.batch, args.prompt_len, cfg.vocab_size)
    config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0,
                            buckets=(args.prompt_len,))
    expected = args.batch * args.new_tokens
    start_wall, (start_machine, start_self) = time.perf_counter(), busy_cpu_seconds()
    runners = {"reval_jax": ours_runner(model, prompts, config),
               "transformers": transformers_runner(hf, prompts, args.new_tokens)}
    first = {name: run() for name, run in runners.items()}  # compile / warm-up
    times = {name: [] for name in runners}
    for _ in range(args.repeats):  # interleaved, so that load from elsewhere hits both sides
        for name, run in runners.items():
            seconds, generated = run()
            assert generated == expected, (name, generated)
            times[name].append(seconds)
    prefill_s, decode_s = ours_split(model, prompts, config)
    end_machine, end_self = busy_cpu_seconds()
    others = (end_machine - start_machine) - (end_self - start_self)
    wall = time.perf_counter() - start_wall

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"load average before/after {args.load_before:.2f}/{os.getloadavg()[0]:.2f}; other "
          f"processes used {others / wall:.2f} cores on average during the measurement")
    print(f"workload: bench preset ({cfg.num_params() / 1e6:.1f}M params, float32), "
          f"{args.batch} prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens each "
          f"({expected} tokens), temperature 1.0; {args.repeats} interleaved repeats")
    tps = {}
    for name in runners:
        best, median = min(times[name]), float(np.median(times[name]))
        tps[name] = expected / best
        print(f"{name:12s} first call {first[name][0]:6.2f} s | best {best:6.2f} s = "
              f"{expected / best:7.1f} tokens/s | median {median:6.2f} s = "
              f"{expected / median:7.1f} tokens/s")
    print(f"reval_jax split: prefill {prefill_s:.3f} s, decode loop {decode_s:.2f} s "
          f"({1e3 * decode_s / (args.new_tokens - 1):.1f} ms/step, "
          f"{args.batch * (args.new_tokens - 1) / decode_s:.1f} tokens/s)")
    print(f"ratio reval_jax / transformers (best): {tps['reval_jax'] / tps['transformers']:.2f}x; "
          f"(median): {np.median(times['transformers']) / np.median(times['reval_jax']):.2f}x")


def gpu_bench(args):
    cfg = preset("deepseek-r1-distill-qwen-1.5b", param_dtype="bfloat16", dtype="bfloat16")
    batches, new_tokens, prompt_len = args.gpu_batches, args.gpu_new_tokens, args.gpu_prompt_len
    if args.tiny_smoke:
        cfg = cfg.replace(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=32)
        batches, new_tokens, prompt_len = [4, 8], 16, 16
    model = reval_jax.create_model(cfg, seed=0)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"HBM bandwidth {args.bandwidth:.3g} B/s"
          f"{'; TINY SMOKE RUN, not a measurement' if args.tiny_smoke else ''}")
    print(f"model: {cfg.num_params() / 1e9:.3f}B params, bfloat16, random weights; prompts of "
          f"{prompt_len} tokens, {new_tokens} new tokens, temperature 1.0, no stop tokens")
    itemsize = 2
    # every parameter is read once per step, except the embedding table (B rows are gathered)
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    weight_bytes = (cfg.num_params() - embed) * itemsize
    for batch in batches:
        prompts = prompts_for(batch, prompt_len, cfg.vocab_size)
        config = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, buckets=(prompt_len,))
        run = ours_runner(model, prompts, config)
        first_s, generated = run()
        assert generated == batch * new_tokens
        seconds = min(run()[0] for _ in range(args.repeats))
        _, decode_s = ours_split(model, prompts, config)
        step_s = decode_s / (new_tokens - 1)
        per_slot = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * itemsize  # k, v
        kv_read = per_slot * (prompt_len + new_tokens)  # the whole preallocated cache, as attended
        kv_filled = per_slot * (prompt_len + new_tokens / 2)  # only its filled part, on average
        bound_read = (weight_bytes + kv_read) / args.bandwidth
        bound_filled = (weight_bytes + kv_filled) / args.bandwidth
        print(f"batch {batch:4d}: first call {first_s:6.1f} s | end-to-end "
              f"{generated / seconds:9.0f} tokens/s | decode loop {batch * (new_tokens - 1) / decode_s:9.0f} tokens/s, "
              f"{1e3 * step_s:.3f} ms/step | bytes/step {weight_bytes / 1e6:.1f} MB weights + "
              f"{kv_read / 1e6:.1f} MB KV cache | fraction of the bandwidth bound "
              f"{bound_read / step_s:.2f} (whole cache) / {bound_filled / step_s:.2f} "
              "(filled part)")


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the 1.5B-shaped bfloat16 benchmark")
    p.add_argument("--tiny-smoke", action="store_true", help="with --gpu: tiny config, runs on CPU")
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="HBM bytes/s (H100 SXM)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--gpu-batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--gpu-new-tokens", type=int, default=1024)
    p.add_argument("--gpu-prompt-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    args.load_before = os.getloadavg()[0]
    gpu_bench(args) if args.gpu else cpu_bench(args)


if __name__ == "__main__":
    main()
