"""Train-step throughput: the jitted ReVal update of reval_jax against `transformers` + PyTorch.

CPU (default): the `bench` preset (Qwen2 architecture, V 32000, D 512, F 1408, 8 layers, 8 heads,
4 kv heads), float32, 16 sequences of 64 prompt + 128 response tokens, ReVal with β = 0.02 and
centered rewards, then global-norm clip 1.0 and AdamW (lr 1e-6, betas 0.9/0.999, eps 1e-8, weight
decay 0.01). In the same process PyTorch runs the same update on the same weights (ours exported
with `save_hf`, loaded with `AutoModelForCausalLM.from_pretrained`): full logits, float32
log_softmax, per-token log π of the response tokens, V(s_1) = logsumexp at the last prompt position,

    δ = (V − V_ref) + Σ_h (log π − log π_ref) − r/β,    loss = mean δ²,

`clip_grad_norm_(1.0)` and `torch.optim.AdamW`. The reference terms come from a second random model
(a policy that has drifted from its reference) and are fed to both sides. The first step checks that
both losses agree (relative difference < 1e-4) before anything is timed; the steps then alternate
JAX / PyTorch and the medians are reported:

    python benchmarks/train_bench.py --torch-logits-to-keep --steps 9   # docs/bench_train.md
    python benchmarks/train_bench.py --skip-torch --chunk 4096          # JAX-only variants

`--torch-logits-to-keep` adds PyTorch unembedding only the positions from s_1 on (less work than
ours, which unembeds every position). Each side's process CPU seconds per step are printed too:
on a shared machine they show how much of the wall time was lost to contention.

GPU: the DeepSeek-R1-Distill-Qwen-1.5B shapes with random weights, float32 master weights and
bfloat16 compute, rematerialised layers, 512 prompt + 7680 response tokens per sequence; reports
tokens/s and model FLOPs utilisation

    MFU = [6·N·B·T + 12·L·T²·(N_heads·H)·B] / step seconds / peak FLOP/s

with N the matmul parameters (every weight but the input embedding table, a lookup; the untied
lm_head counted), B sequences of T tokens per step, L layers; the attention term counts the full
T×T score and value products (no causal halving) and rematerialisation is not counted:

    python benchmarks/train_bench.py --gpu --batch 8 --micro-batches 8 [--peak-flops 989e12]
    python benchmarks/train_bench.py --smoke                # the same code path, tiny, on CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import reval_jax  # noqa: E402
from reval_jax.batch import Trajectories  # noqa: E402
from reval_jax.config import preset  # noqa: E402
from reval_jax.losses import transform_rewards  # noqa: E402
from reval_jax.train_step import (  # noqa: E402
    OptimizerConfig,
    StepConfig,
    init_state,
    jit_train_step,
    make_optimizer,
    reference_stats,
)

# ----------------------------------------------------------------------------- compile accounting

_COMPILES: list[tuple[str, float]] = []


def _on_duration(event: str, seconds: float, **_):
    if event.endswith("backend_compile_duration") or event.endswith("jaxpr_to_mlir_module_duration"):
        _COMPILES.append((event, seconds))


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds(since: int = 0) -> tuple[int, float]:
    """(number of XLA compilations, seconds in lowering + compilation) recorded after `since`."""
    events = _COMPILES[since:]
    n = sum(e.endswith("backend_compile_duration") for e, _ in events)
    return n, sum(s for _, s in events)


# ----------------------------------------------------------------------------- the batch


def make_batch(B: int, prompt_len: int, response_len: int, vocab: int, group: int = 4,
               seed: int = 0) -> Trajectories:
    """B full sequences (no padding): prompt_len prompt tokens, then response_len response tokens;
    rewards 0/1 centered within groups of `group` samples; reference terms still zero."""
    rng = np.random.RandomState(seed)
    T = prompt_len + response_len
    tokens = rng.randint(1, vocab, (B, T)).astype(np.int32)
    resp = np.zeros((B, T), bool)
    resp[:, prompt_len:] = True
    group_id = np.arange(B) // group
    raw = rng.randint(0, 2, B).astype(np.float32)
    raw[::group] = 1.0 - raw[1::group]  # every group mixed, so centered rewards are non-zero
    zeros_t = np.zeros((B, T), np.float32)
    return Trajectories.from_numpy(dict(
        tokens=tokens, attn_mask=np.ones((B, T), bool), response_mask=resp,
        s1_index=np.full(B, prompt_len - 1), group_id=group_id,
        reward=transform_rewards(raw, group_id, "centered"), raw_reward=raw,
        ref_logp=zeros_t, ref_v=np.zeros(B), ref_version=np.zeros(B), sampler_logp=zeros_t,
        iteration=np.zeros(B),
    ))


def fill_reference(graphdef, ref_params, batch: Trajectories, cfg: StepConfig,
                   slice_size: int | None = None) -> Trajectories:
    """The batch with log π_ref and V_ref(s_1) of `ref_params`, `slice_size` sequences at a time."""
    fn = jax.jit(lambda p, b: reference_stats(graphdef, p, b, cfg))
    B = batch.batch_size
    n = slice_size or B
    parts = [fn(ref_params, jax.tree.map(lambda x, i=i: jnp.asarray(x[i:i + n]), batch))
             for i in range(0, B, n)]
    ref_logp = np.concatenate([np.asarray(p[0]) for p in parts])
    ref_v = np.concatenate([np.asarray(p[1]) for p in parts])
    arrays = batch.to_numpy()
    arrays.update(ref_logp=ref_logp, ref_v=ref_v)
    return Trajectories.from_numpy(arrays)


# ----------------------------------------------------------------------------- the JAX side


class JaxSide:
    """The donated, jitted `train_step` of reval_jax; `step()` runs one update and returns its
    host metrics and wall seconds."""

    def __init__(self, model, batch: Trajectories, cfg: StepConfig, opt_cfg: OptimizerConfig,
                 ref_dtype: str | None = None):
        self.graphdef, params = nnx.split(model)
        self.optimizer = make_optimizer(opt_cfg)
        self.state = init_state(jax.tree.map(jnp.copy, params), self.optimizer, ref_dtype=ref_dtype)
        self.batch = jax.tree.map(jnp.asarray, batch)
        self.weights = jnp.ones(batch.batch_size, jnp.float32)
        self.fn = jit_train_step(self.graphdef, self.optimizer, cfg, self.state, self.batch)
        self.donation_ok: bool | None = None

    def step(self) -> tuple[dict, float, float]:
        old = self.state
        t0, c0 = time.perf_counter(), time.process_time()
        self.state, metrics = self.fn(self.state, self.batch, self.weights)
        metrics = jax.device_get(jax.block_until_ready(metrics))
        jax.block_until_ready(self.state)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if self.donation_ok is None:  # donated buffers are consumed: the old state is gone
            self.donation_ok = all(x.is_deleted() for x in jax.tree.leaves(old.params))
        return metrics, seconds, cpu


# ----------------------------------------------------------------------------- the PyTorch side


class TorchSide:
    """The same update in `transformers` + PyTorch (eager, CPU): ReVal residual from float32
    log_softmax of the logits, `clip_grad_norm_(max_norm)`, `torch.optim.AdamW`."""

    def __init__(self, hf_dir: str, batch: Trajectories, beta: float, opt_cfg: OptimizerConfig,
                 attn_implementation: str, logits_to_keep: bool = False):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation=attn_implementation
        ).train()
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=opt_cfg.learning_rate, betas=(opt_cfg.b1, opt_cfg.b2),
            eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay,
        )
        self.max_norm = opt_cfg.max_grad_norm
        self.beta = beta
        b = batch.to_numpy()
        t = lambda x: torch.from_numpy(np.ascontiguousarray(x))
        self.tokens = t(b["tokens"]).long()  # [B, T]
        self.attn = t(b["attn_mask"]).long()
        self.resp = t(b["response_mask"])
        self.s1 = t(b["s1_index"]).long()
        self.ref_logp, self.ref_v, self.reward = t(b["ref_logp"]), t(b["ref_v"]), t(b["reward"])
        # logits_to_keep: unembed only the positions from the earliest s_1 on (what TRL does); less
        # work than our side, which unembeds every position. Off for the matched comparison.
        T = self.tokens.shape[1]
        self.keep = T - int(b["s1_index"].min()) if logits_to_keep else 0

    def loss(self):
        torch = self.torch
        T = self.tokens.shape[1]
        out = self.model(input_ids=self.tokens, attention_mask=self.attn,
                         logits_to_keep=self.keep)
        logits = out.logits.float()  # [B, T', V], positions T-T'..T-1
        first = T - logits.shape[1]  # position of logits[:, 0]
        logsm = torch.log_softmax(logits[:, :-1], dim=-1)  # position t-1 predicts token t
        targets = self.tokens[:, first + 1:]  # [B, T'-1]
        logp = logsm.gather(-1, targets[..., None])[..., 0]  # [B, T'-1]
        mask = self.resp[:, first + 1:]
        diff = torch.where(mask, logp - self.ref_logp[:, first + 1:], 0.0)
        rows = torch.arange(self.tokens.shape[0])
        v = torch.logsumexp(logits[rows, self.s1 - first], dim=-1)  # [B]  V(s_1)
        delta = (v - self.ref_v) + diff.sum(-1) - self.reward / self.beta
        return torch.mean(delta * delta)

    def step(self) -> tuple[dict, float, float]:
        torch = self.torch
        t0, c0 = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.opt.step()
        metrics = {"loss": float(loss.detach()), "grad_norm": float(grad_norm)}
        return metrics, time.perf_counter() - t0, time.process_time() - c0


# ----------------------------------------------------------------------------- CPU benchmark


def machine_line() -> str:
    try:
        model_name = next(line.split(":", 1)[1].strip() for line in
                          subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                          if line.startswith("Model name"))
    except (OSError, StopIteration):
        model_name = platform.processor() or platform.machine()
    return (f"{model_name}, {os.cpu_count()} CPUs (nproc), this process may use "
            f"{len(os.sched_getaffinity(0))}")


def cpu_bench(args):
    import torch
    import transformers

    # one intra-op thread per core this process may run on (= os.cpu_count() unless under taskset)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = preset("bench", remat=args.remat)
    step_cfg = StepConfig(loss="reval", beta=args.beta, chunk=args.chunk,
                          micro_batches=args.micro_batches)
    opt_cfg = OptimizerConfig()  # lr 1e-6, (0.9, 0.999), eps 1e-8, wd 0.01, clip 1.0
    policy = reval_jax.create_model(cfg, seed=0)
    reference = reval_jax.create_model(cfg, seed=1)
    ref_graphdef, ref_params = nnx.split(reference)
    batch = make_batch(args.batch, args.prompt_len, args.response_len, cfg.vocab_size)
    batch = fill_reference(ref_graphdef, ref_params, batch, step_cfg)
    tokens = args.batch * (args.prompt_len + args.response_len)

    print(f"machine: {machine_line()}; jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"transformers {transformers.__version__}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {os.getloadavg()}")
    print(f"workload: bench preset ({cfg.num_params() / 1e6:.1f}M params, float32, remat "
          f"{cfg.remat}), {args.batch} x ({args.prompt_len} prompt + {args.response_len} response) "
          f"= {tokens} tokens/step, ReVal beta={args.beta}, chunk={args.chunk}, micro_batches="
          f"{args.micro_batches}, AdamW lr 1e-6 + clip 1.0; median of {args.steps} steps after "
          f"{args.warmup} warm-up")

    ours = JaxSide(policy, batch, step_cfg, opt_cfg)
    before = len(_COMPILES)
    m_jax, first_s, _ = ours.step()
    n_compiles, compile_s = compile_seconds(before)
    print(f"reval_jax first call {first_s:.2f} s ({n_compiles} XLA compilation(s), "
          f"{compile_s:.2f} s lowering + compiling); donated state consumed: {ours.donation_ok}")

    sides = {"reval_jax": ours}
    if not args.skip_torch:
        with tempfile.TemporaryDirectory() as d:
            reval_jax.save_hf(policy, None, d)
            sides["transformers"] = TorchSide(d, batch, args.beta, opt_cfg, args.attn)
            if args.torch_logits_to_keep:
                sides["transformers keep"] = TorchSide(d, batch, args.beta, opt_cfg, args.attn,
                                                       logits_to_keep=True)
        m_torch, torch_first_s, _ = sides["transformers"].step()
        rel = abs(m_jax["loss"] - m_torch["loss"]) / abs(m_torch["loss"])
        rel_gn = abs(m_jax["grad_norm"] - m_torch["grad_norm"]) / m_torch["grad_norm"]
        print(f"first-step check: loss reval_jax {m_jax['loss']:.6f}  torch {m_torch['loss']:.6f}  "
              f"rel diff {rel:.2e} (< 1e-4: {rel < 1e-4}); grad norm {m_jax['grad_norm']:.6f} vs "
              f"{m_torch['grad_norm']:.6f} rel diff {rel_gn:.2e}")
        if rel >= 1e-4:
            raise SystemExit("the two sides do not compute the same loss; not timing them")
        print(f"transformers first call {torch_first_s:.2f} s")
        if "transformers keep" in sides:
            m_keep, _, _ = sides["transformers keep"].step()
            print(f"transformers keep (logits_to_keep) first-step loss {m_keep['loss']:.6f}")

    # steps alternate between the sides, so that a change of machine load hits them alike
    wall = {name: [] for name in sides}
    cpu = {name: [] for name in sides}
    before_loop = len(_COMPILES)
    for i in range(args.warmup + args.steps):
        parts = []
        for name, side in sides.items():
            m, s, c = side.step()
            if i >= args.warmup:
                wall[name].append(s)
                cpu[name].append(c)
            parts.append(f"{name} {s:6.2f} s (cpu {c:6.2f}) loss {m['loss']:.4f}")
        print(f"step {i + 2:2d}: " + " | ".join(parts) + (" (warm-up)" if i < args.warmup else ""),
              flush=True)
    n_compiles, _ = compile_seconds(before_loop)
    print(f"XLA compilations after the first call: {n_compiles}; train-step jit cache entries "
          f"{ours.fn._cache_size()}; load average {os.getloadavg()}")

    med = {name: statistics.median(w) for name, w in wall.items()}
    for name, w in wall.items():
        print(f"{name:17s} steady {med[name]:7.3f} s/step {tokens / med[name]:8.1f} tokens/s  "
              f"(min {min(w):.3f}, max {max(w):.3f}; process CPU {statistics.median(cpu[name]):.2f} "
              f"s/step)")
    for name in sides:
        if name != "reval_jax":
            paired = statistics.median(t / j for t, j in zip(wall[name], wall["reval_jax"], strict=True))
            print(f"ratio reval_jax / {name} (tokens/s): {med[name] / med['reval_jax']:.2f}x "
                  f"(ratio of medians; median of the per-round ratios {paired:.2f}x)")


# ----------------------------------------------------------------------------- GPU benchmark


def model_flops(cfg, batch: int, length: int) -> float:
    """6·N·B·T + 12·L·T²·(N_heads·H)·B (see the module docstring)."""
    n = cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attn = 12 * cfg.num_layers * length**2 * cfg.num_heads * cfg.head_dim
    return 6 * n * batch * length + attn * batch


def gpu_bench(args):
    cfg = preset("deepseek-r1-distill-qwen-1.5b", param_dtype="float32", dtype="bfloat16",
                 remat=args.gpu_remat)
    batch_size, prompt_len, response_len = args.batch, args.gpu_prompt_len, args.gpu_response_len
    micro, steps, warmup = args.micro_batches, args.steps, args.warmup
    if args.smoke:
        cfg = cfg.replace(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=32)
        batch_size, prompt_len, response_len, micro, steps, warmup = 4, 16, 48, 2, 2, 1
    step_cfg = StepConfig(loss="reval", beta=args.beta, chunk=args.chunk, micro_batches=micro)
    T = prompt_len + response_len
    tokens = batch_size * T
    flops = model_flops(cfg, batch_size, T)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}"
          f"{'  (smoke: tiny sizes, not a measurement)' if args.smoke else ''}")
    print(f"model: {cfg.num_params() / 1e9:.3f}B params, float32 master weights, bfloat16 compute, "
          f"remat {cfg.remat}; batch {batch_size} x ({prompt_len} + {response_len}) = {tokens} "
          f"tokens/step in {micro} micro-batch(es), chunk {args.chunk}, ReVal beta={args.beta}")

    model = reval_jax.create_model(cfg, seed=0)
    batch = make_batch(batch_size, prompt_len, response_len, cfg.vocab_size)
    graphdef, params = nnx.split(model)
    # reference terms from a bfloat16 copy of the policy, one micro-batch at a time
    ref = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    batch = fill_reference(graphdef, ref, batch, step_cfg, slice_size=batch_size // micro)
    del ref
    ours = JaxSide(model, batch, step_cfg, OptimizerConfig(), ref_dtype="bfloat16")
    del model, params
    before = len(_COMPILES)
    m, first_s, _ = ours.step()
    n_compiles, compile_s = compile_seconds(before)
    print(f"first call {first_s:.1f} s ({n_compiles} compilation(s), {compile_s:.1f} s lowering + "
          f"compiling); loss {m['loss']:.4f}; donated state consumed: {ours.donation_ok}")
    times = []
    for i in range(warmup + steps):
        m, s, _ = ours.step()
        if i >= warmup:
            times.append(s)
        print(f"step {i + 2}: {s:.3f} s, loss {m['loss']:.4f}, grad norm {m['grad_norm']:.4f}"
              + (" (warm-up)" if i < warmup else ""), flush=True)
    step_s = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    peak_mem = stats.get("peak_bytes_in_use")
    print(f"steady {step_s:.3f} s/step, {tokens / step_s:.0f} tokens/s, model FLOPs "
          f"{flops / 1e12:.1f} TFLOP/step = {flops / step_s / 1e12:.1f} TFLOP/s, MFU "
          f"{flops / step_s / args.peak_flops:.3f} of {args.peak_flops:.3g} FLOP/s"
          + (f"; peak device memory {peak_mem / 2**30:.1f} GiB" if peak_mem else ""))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the 1.5B-shaped bfloat16-compute benchmark")
    p.add_argument("--smoke", action="store_true", help="the --gpu code path with tiny sizes (runs on CPU)")
    p.add_argument("--beta", type=float, default=0.02)
    p.add_argument("--batch", type=int, default=None, help="sequences per update (CPU 16, GPU 8)")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="gradient-accumulation steps per update (CPU 1, GPU = batch)")
    p.add_argument("--chunk", type=int, default=1024, help="StepConfig.chunk (unembedding rows)")
    p.add_argument("--steps", type=int, default=7, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first call")
    # CPU
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--remat", default="none", help="CPU: ModelConfig.remat of our side")
    p.add_argument("--attn", default="sdpa", help="CPU: transformers attn_implementation")
    p.add_argument("--skip-torch", action="store_true", help="CPU: time our side only")
    p.add_argument("--torch-logits-to-keep", action="store_true",
                   help="CPU: also time PyTorch unembedding only the response positions")
    # GPU
    p.add_argument("--gpu-prompt-len", type=int, default=512)
    p.add_argument("--gpu-response-len", type=int, default=7680)
    p.add_argument("--gpu-remat", default="full", help="GPU: full | dots_no_batch | dots | none")
    p.add_argument("--peak-flops", type=float, default=989e12, help="H100 SXM bf16 dense")
    args = p.parse_args()
    gpu = args.gpu or args.smoke
    if args.batch is None:
        args.batch = 8 if gpu else 16
    if args.micro_batches is None:
        args.micro_batches = args.batch if gpu else 1
    gpu_bench(args) if args.gpu or args.smoke else cpu_bench(args)


if __name__ == "__main__":
    main()
