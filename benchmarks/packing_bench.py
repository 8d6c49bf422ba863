"""Padding overhead of the update and reference passes: tokens processed per update / real tokens.

For each length distribution the script builds one update batch of trajectories, packs it exactly
as the run does (`reval_jax.objective.packing.pack` with the config's row length, token budget and
data-parallel device count) and prints

    processed / real = Σ over micro-batches of rows × row_len  /  Σ trajectory lengths

next to the padded layout it replaces (every trajectory padded to prompt bucket + max_new_tokens).

Distributions:
  demo   measured: the tiny arithmetic model (configs/tiny.py) sampling 16 prompts × 8 rollouts of
         its medium training set at temperature 1, three rounds (real prompt and response lengths).
  qwen7b modelled on the paper's Qwen2.5-Math-7B run (configs/qwen7b.py, 8 devices): prompt
         lengths from the MATH training problems under the qwen_math template at ~3.5 characters
         per token (no Qwen tokenizer is available offline); response lengths log-normal with mean
         ~600 tokens, cut at max_new_tokens 3,072 (~2% of responses hit the cap).
  r1     the same for DeepSeek-R1-Distill-1.5B (configs/dpsk_r1_distill_1p5b.py, 8 devices):
         log-normal responses with mean ~5,000 tokens cut at 8,192.

    python benchmarks/packing_bench.py [--skip-demo]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reval_jax.data.batch import Trajectories  # noqa: E402
from reval_jax.objective.packing import Budget, pack  # noqa: E402
from reval_jax.rollout.sampler import bucket_length  # noqa: E402

CHARS_PER_TOKEN = 3.5
QWEN_MATH_OVERHEAD = 40  # tokens of the system turn, chat markup and the instruction sentence


def batch_of(prompt_lens: np.ndarray, response_lens: np.ndarray, bucket: int, max_new: int) -> Trajectories:
    """A sampler-layout host batch: prompts left-padded to `bucket`, responses right-padded."""
    B, T = len(prompt_lens), bucket + max_new
    idx = np.arange(T)[None, :]
    p, a = prompt_lens[:, None], response_lens[:, None]
    prompt = (idx >= bucket - p) & (idx < bucket)
    response = (idx >= bucket) & (idx < bucket + a)
    zeros = np.zeros((B, T), np.float32)
    return Trajectories.from_numpy(dict(
        tokens=np.where(prompt | response, 7, 0), attn_mask=prompt | response, response_mask=response,
        s1_index=np.full(B, bucket - 1), group_id=np.arange(B) // 8, reward=np.zeros(B), raw_reward=np.zeros(B),
        ref_logp=zeros, ref_v=np.zeros(B), ref_version=np.zeros(B), sampler_logp=zeros, iteration=np.zeros(B)))


def lognormal_lengths(rng, n: int, mean: float, cap: int, sigma: float = 1.0) -> np.ndarray:
    mu = np.log(mean) - sigma**2 / 2  # E[exp(N(mu, sigma))] = mean
    return np.clip(np.round(rng.lognormal(mu, sigma, n)), 1, cap).astype(np.int64)


def math_prompt_lengths(rng, n: int, max_prompt: int) -> np.ndarray:
    rows = [json.loads(line) for line in (ROOT.parent / "shared/data/math/math_train.jsonl").open()]
    chars = np.array([len(r["problem"]) for r in rows])
    lengths = np.ceil(chars / CHARS_PER_TOKEN).astype(np.int64) + QWEN_MATH_OVERHEAD
    lengths = lengths[lengths <= max_prompt]  # longer prompts are dropped by the data loader
    return rng.choice(lengths, n)


def demo_lengths(rounds: int = 3) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    from configs import tiny
    from reval_jax import load_hf
    from reval_jax.data.prompts import LoadOptions, prompt_batches
    from reval_jax.data.templates import stop_token_ids
    from reval_jax.rollout.sampler import SamplingConfig, generate

    c = tiny.get_config()
    model, tokenizer = load_hf(str(ROOT / c.model.path))
    data, _ = prompt_batches([str(ROOT / f) for f in c.data.train_files], tokenizer,
                             LoadOptions(c.data.template, c.data.max_prompt_len), c.data.prompts_per_iteration, seed=0)
    sampling = SamplingConfig(max_new_tokens=c.sampling.max_new_tokens, num_samples=c.sampling.num_samples,
                              stop_ids=tuple(stop_token_ids(tokenizer)), buckets=tuple(c.sampling.buckets))
    prompts, responses = [], []
    for i in range(rounds):
        examples = next(data)
        rollout = generate(model, [e.prompt_ids for e in examples], sampling, seed=i)
        prompts.append(np.repeat([len(e.prompt_ids) for e in examples], sampling.num_samples))
        responses.append(np.asarray(rollout.response_length))
    return np.concatenate(prompts), np.concatenate(responses), c.sampling.buckets[0], c.sampling.max_new_tokens, \
        c.row_tokens


def report(name: str, prompts, responses, bucket: int, max_new: int, tokens_per_device: int, devices: int,
           per_update: int, row_len: int = 0):
    rows = []
    for start in range(0, len(prompts) - per_update + 1, per_update):  # one update batch at a time
        part = slice(start, start + per_update)
        batch = batch_of(prompts[part], responses[part], bucket, max_new)
        budget = Budget(row_len=row_len or bucket + max_new, tokens_per_device=tokens_per_device, devices=devices)
        micro, layout = pack(batch, budget)
        real = int(layout.length.sum())
        rows.append((real, layout.tokens_processed, len(micro), batch.batch_size * batch.length))
    real, processed, micro, padded = (np.array(x) for x in zip(*rows, strict=True))
    print(f"{name}: {len(rows)} update batch(es) of {per_update} trajectories; prompt mean "
          f"{prompts.mean():.0f} tokens, response mean {responses.mean():.0f} (max {responses.max()}, "
          f"{np.mean(responses >= max_new):.1%} at the cap {max_new}); rows of {row_len or bucket + max_new} tokens, "
          f"{tokens_per_device} tokens/device x {devices} devices")
    print(f"  packed:  processed / real = {np.mean(processed / real):.3f}  ({micro.mean():.1f} micro-batches "
          f"per update)")
    print(f"  padded:  processed / real = {np.mean(padded / real):.3f}  (the layout before packing)")
    return float(np.mean(processed / real))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-demo", action="store_true", help="skip the measured tiny-model distribution")
    p.add_argument("--updates", type=int, default=5, help="update batches per modelled distribution")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    if not args.skip_demo:
        prompts, responses, bucket, max_new, row_len = demo_lengths()
        report("demo (configs/tiny.py, measured)", prompts, responses, bucket, max_new, 16384, 1, 128, row_len)
    from configs import dpsk_r1_distill_1p5b, qwen7b

    for name, module, mean, sigma in (("qwen7b (modelled)", qwen7b, 600, 1.0),
                                      ("r1 1.5B (modelled)", dpsk_r1_distill_1p5b, 5000, 0.6)):
        c = module.get_config()  # the shipped config's lengths and token budget, on 8 devices
        per_update = c.data.prompts_per_iteration * c.sampling.num_samples
        n = per_update * args.updates
        bucket, max_new = bucket_length(c.data.max_prompt_len, c.sampling.buckets), c.sampling.max_new_tokens
        prompts = math_prompt_lengths(rng, n, c.data.max_prompt_len)
        responses = lognormal_lengths(rng, n, mean, max_new, sigma)
        report(name, prompts, responses, bucket, max_new, c.tokens_per_device, 8, per_update, c.row_tokens)


if __name__ == "__main__":
    main()
