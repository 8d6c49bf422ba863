"""One device check for a short accelerator lease: GPU correctness, then engine and update speed.

    python benchmarks/device_check.py --out=/tmp/dc               # one GPU: <= 8 minutes, compiles included
    python benchmarks/device_check.py --out=/tmp/dc --cpu-smoke   # the same code paths, tiny, on CPU

Writes `device_check.json` and `device_check.md` (one table) to --out after every stage, so a lease
that ends early leaves the stages done so far. Stages (figures and tolerances: docs/device_check.md):

  attention          cuDNN attention against the chunked reference on packed rows: outputs, gradients
  engine_greedy      the engine's greedy tokens against the static sampler's (rows part only at near ties)
  update_vs_cpu      one ReVal update (f32 master weights, bf16 compute) on the device against the same
                     update on jax.devices("cpu") in this process: loss, grad norm, parameter steps
  engine_throughput  the engine at the 1.5B shape, bf16, 256 slots, 1,024 new tokens: tokens/s and the
                     fraction of the HBM-bandwidth bound (weights + KV pages read per decode step)
  update_mfu         the update at the 1.5B shape (8 x 8,192 tokens): tokens/s and MFU (analytic FLOPs)

Each stage runs in a process of its own (`--stage`) under a wall-clock budget: a stage that fails,
crashes or runs past its budget is recorded so, and the next starts on a clean device. Bandwidth and
peak FLOP/s come from DEVICE_SPECS by device kind (`--hbm_bandwidth`, `--peak_flops` override). Only
public JAX APIs: it runs on the JAX an accelerator image brings. The parent process never imports jax.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

# (substring of jax's device_kind, HBM bytes/s, peak bf16 dense FLOP/s), first match wins
DEVICE_SPECS = (
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100", 3.35e12, 989e12),  # SXM
    ("H200", 4.8e12, 989e12),
)
# The smoke run's stand-ins: a CPU has no HBM bound worth the name; these only make the figures finite.
SMOKE_SPEC = (20e9, 1e12)
BF16_TOL = 2**-5  # bfloat16 keeps 8 significant bits: outputs of magnitude 1-4 round to 2^-7..2^-6
# The greedy check runs in float32 at "highest" matmul precision (no TF32): in bfloat16 two programs'
# logits differ by more than a random model's gaps between its best tokens (8 of 12 rows parted at
# near ties within 64 tokens, CPU). Median gap of the best two logits: 0.07 (bench shapes).
TIE_TOL = 1e-3  # logit gap within which two float32 programs may pick either token
PARAM_LEAVES = ("embed", "q_proj", "down_proj", "final_norm", "lm_head")  # compared by update_vs_cpu
MIN_AGREED_ROWS = 0.9  # near ties are rare: nearly every row must be the static sampler's


# ----------------------------------------------------------------------------- comparisons


@dataclasses.dataclass(frozen=True)
class Check:
    """One compared quantity: the discrepancy measured and the bound it must stay within."""

    name: str
    error: float
    tolerance: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error)) and self.error <= self.tolerance

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


def max_abs_check(name: str, got, want, tolerance: float, where=None) -> Check:
    """max |got − want| over `where` (default everywhere); NaN anywhere fails."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = np.abs(got - want) if where is None else np.abs(got - want)[where]
    error = float(diff.max()) if np.isfinite(diff).all() else math.nan
    return Check(name, error, tolerance, f"max |diff| over {diff.size} values")


def relative_check(name: str, got, want, tolerance: float) -> Check:
    """||got − want|| / ||want|| (the L2 norm over all elements; scalars: relative difference)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    error = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    return Check(name, error if np.isfinite(error) else math.nan, tolerance, "relative L2 difference")


def token_check(got: np.ndarray, want: np.ndarray, logits: np.ndarray, tie_tol: float) -> tuple[Check, dict]:
    """Greedy tokens of two programs, got / want [R, A], against `logits` [R, A, V] of a full forward
    over want's rows. A row may part ways only at a near tie: at its first differing column h both
    tokens' logits are within `tie_tol` of the best one (over want's prefix, which got shares up to
    h). The check's error is the fraction of rows that part elsewhere, plus a penalty of 1 when
    fewer than MIN_AGREED_ROWS of the rows agree throughout."""
    equal, at_tie, elsewhere = 0, 0, []
    for i in range(want.shape[0]):
        differ = np.flatnonzero(got[i] != want[i])
        if not differ.size:
            equal += 1
            continue
        h = int(differ[0])
        gap = float(logits[i, h].max() - min(logits[i, h, got[i, h]], logits[i, h, want[i, h]]))
        if gap <= tie_tol:
            at_tie += 1
        else:
            elsewhere.append({"row": i, "column": h, "logit_gap": gap})
    R = want.shape[0]
    error = len(elsewhere) / R + (1.0 if equal < MIN_AGREED_ROWS * R else 0.0)
    detail = (f"{equal}/{R} rows equal, {at_tie} part at a near tie (gap <= {tie_tol:g}), "
              f"{len(elsewhere)} elsewhere; at least {MIN_AGREED_ROWS:.0%} must be equal")
    return Check("greedy tokens: engine == static sampler", error, 0.0, detail), {
        "rows": R, "rows_equal": equal, "rows_parted_at_near_tie": at_tie, "rows_parted_elsewhere": elsewhere[:8]}


# ----------------------------------------------------------------------------- the stages' context


@dataclasses.dataclass(frozen=True)
class Context:
    """What a stage process knows about where it runs."""

    smoke: bool
    platform: str  # jax.devices()[0].platform
    device_kind: str
    hbm_bandwidth: float | None  # bytes/s
    peak_flops: float | None  # bf16 dense FLOP/s
    spec_source: str  # where the two figures above came from
    budget_s: float = math.inf  # the stage's wall-clock budget: timed repeats stop well before it
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def time_left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def device_spec(kind: str, smoke: bool, bandwidth: float | None, peak: float | None):
    """(bandwidth, peak, source): the overrides, else DEVICE_SPECS by device kind, else the smoke
    stand-ins (CPU smoke) or None (an unknown accelerator: its fractions are not computed)."""
    match = next(((b, p, s) for s, b, p in DEVICE_SPECS if s.lower() in kind.lower()), None)
    if smoke:
        match = (*SMOKE_SPEC, "smoke stand-ins, not a real bound")
    elif match:
        match = (match[0], match[1], f"DEVICE_SPECS[{match[2]!r}]")
    base_b, base_p, source = match or (None, None, f"unknown device kind {kind!r}")
    if bandwidth or peak:
        source += "; overridden by " + ", ".join(n for n, v in (("--hbm_bandwidth", bandwidth),
                                                                ("--peak_flops", peak)) if v)
    return bandwidth or base_b, peak or base_p, source


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn() (each blocked until ready)."""
    import jax

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def small_config(smoke: bool, dtype: str, param_dtype: str | None = None):
    """The correctness stages' random model: the bench preset's shapes on a GPU (H = 64, cuDNN's
    head dims), a few thousand parameters for the smoke run."""
    from reval_jax.model.config import preset

    cfg = preset("bench", dtype=dtype, param_dtype=param_dtype or dtype)
    if smoke:
        cfg = cfg.replace(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    return cfg


def tiny_1p5b(cfg):
    """The 1.5B preset shrunk for the smoke run (train_bench's and sampler_bench's smoke sizes)."""
    return cfg.replace(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=32)


# ----------------------------------------------------------------------------- stage: attention


def packed_segments(B: int, T: int, longest: int, seed: int) -> np.ndarray:
    """[B, T] segment ids: segments of 1..longest tokens back to back with some padding (0) between
    and at the end; the last row one segment of `longest` tokens, then padding."""
    rng = np.random.RandomState(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B - 1):
        t, s = 0, 1
        while t < T - 8:
            n = int(rng.randint(1, longest + 1))
            seg[b, t : t + n] = s
            t, s = t + n + int(rng.randint(0, 3)), s + 1
    seg[B - 1, :longest] = 1
    return seg


def stage_attention(ctx: Context) -> dict:
    import jax
    import jax.numpy as jnp

    from reval_jax.model.attention import SegmentMask, attention

    impl = "cudnn" if ctx.platform == "gpu" else "xla"  # xla: the same jax.nn plumbing, on any backend
    B, T, N, K, H, longest = (3, 96, 4, 2, 16, 40) if ctx.smoke else (4, 4096, 12, 2, 128, 1500)
    seg = jnp.asarray(packed_segments(B, T, longest, seed=0))
    r = np.random.RandomState(1)
    q, k, v = (jnp.asarray(r.randn(B, T, n, H), jnp.bfloat16) for n in (N, K, K))
    valid = np.asarray(seg) != 0
    cot = jnp.asarray(r.randn(B, T, N, H) * valid[:, :, None, None], jnp.bfloat16)  # padding queries: 0

    def run(name):  # segment ids and cotangent as arguments: no constant folding of large arrays
        fwd = jax.jit(lambda q, k, v, seg: attention(q, k, v, SegmentMask(seg, seg),
                                                     implementation=name))
        loss = lambda q, k, v, seg, cot: jnp.sum(fwd(q, k, v, seg).astype(jnp.float32) * cot)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        out = np.asarray(fwd(q, k, v, seg), np.float32)
        g = [np.asarray(x, np.float32) for x in grads(q, k, v, seg, cot)]
        return out, g, timed(lambda: fwd(q, k, v, seg), 5), timed(lambda: grads(q, k, v, seg, cot), 5)

    got, got_g, got_s, got_gs = run(impl)
    want, want_g, want_s, want_gs = run("chunked")
    checks = [max_abs_check(f"{impl} output vs chunked (valid queries)", got, want, BF16_TOL, valid)]
    checks += [relative_check(f"{impl} d{n} vs chunked", a, b, BF16_TOL)
               for n, a, b in zip("qkv", got_g, want_g, strict=True)]
    figures = {f"{impl}_forward_ms": 1e3 * got_s, "chunked_forward_ms": 1e3 * want_s,
               f"{impl}_grad_ms": 1e3 * got_gs, "chunked_grad_ms": 1e3 * want_gs,
               "segments": float(len(np.unique(np.asarray(seg))) - 1)}
    notes = [f"B={B} rows x T={T}, N={N} query / K={K} kv heads, H={H}, bfloat16, segments of 1..{longest} "
             f"tokens; {impl}" + ("" if impl == "cudnn" else " stands in for cudnn (no GPU)")]
    return {"checks": checks, "figures": figures, "notes": notes}


# ----------------------------------------------------------------------------- stage: engine greedy


def stage_engine_greedy(ctx: Context) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import reval_jax
    from reval_jax.rollout.engine import EngineConfig
    from reval_jax.rollout.sampler import SamplingConfig, generate, generate_static

    dtype = "float32"  # see TIE_TOL
    cfg = small_config(ctx.smoke, dtype)
    n, lo, hi, bucket, A, page = (10, 3, 40, 48, 12, 4) if ctx.smoke else (12, 5, 200, 256, 64, 8)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(1, cfg.vocab_size, int(rng.randint(lo, hi + 1))).tolist() for _ in range(n)]
    config = SamplingConfig(max_new_tokens=A, greedy=True, buckets=(bucket,))
    width = -(-(bucket + A) // page)
    # 4 slots, small pages, prompts prefilled in chunks, a cache of two sequences: rows are preempted
    engine = EngineConfig(slots=4, page_size=page, cache_tokens=2 * width * page, prefill_chunk=4 * page,
                          prefill_rows=2, block_pages=2)
    with jax.default_matmul_precision("highest"):
        model = reval_jax.create_model(cfg, seed=0)
        want = jax.tree.map(np.asarray, generate_static(model, prompts, config, seed=3))
        got = jax.tree.map(np.asarray, generate(model, prompts, config, seed=3, engine=engine))
        traj = want.to_trajectories()
        graphdef, params = nnx.split(model)
        P = want.prompt_tokens.shape[1]
        forward = jax.jit(lambda p, t, m: nnx.merge(graphdef, p)(t, mask=m)[:, P - 1 : -1])  # [R, A, V]
        logits = np.asarray(forward(params, jnp.asarray(traj.tokens), jnp.asarray(traj.attn_mask)))
    check, agreement = token_check(got.response_tokens, want.response_tokens, logits, TIE_TOL)
    same = np.all(got.response_tokens == want.response_tokens, axis=1)
    lengths = max_abs_check("response lengths where the tokens agree", got.response_length[same],
                            want.response_length[same], 0.0)
    notes = [f"{n} prompts of {lo}..{hi} tokens (bucket {bucket}), {A} greedy tokens, {dtype} (matmul "
             f"precision highest), "
             f"{cfg.num_params() / 1e6:.2f}M parameters; {engine}", json.dumps(agreement)]
    return {"checks": [check, lengths], "figures": {"rows_equal_fraction": agreement["rows_equal"] / len(same)},
            "notes": notes}


# ----------------------------------------------------------------------------- stage: update vs CPU


def make_batch(prompt_len: np.ndarray, response_len: np.ndarray, T: int, vocab: int, seed: int = 0):
    """Trajectories [B, T], each prompt + response from column 0 on (then padding), 0/1 rewards
    centered within groups of 4 (every group mixed), reference terms zero."""
    from reval_jax.data.batch import Trajectories
    from reval_jax.objective.losses import transform_rewards

    rng = np.random.RandomState(seed)
    B = len(prompt_len)
    tokens, attn, resp = np.zeros((B, T), np.int32), np.zeros((B, T), bool), np.zeros((B, T), bool)
    for b, (p, a) in enumerate(zip(prompt_len, response_len, strict=True)):
        tokens[b, : p + a] = rng.randint(1, vocab, p + a)
        attn[b, : p + a], resp[b, p : p + a] = True, True
    group = np.arange(B) // 4
    raw = ((np.arange(B) + group) % 2).astype(np.float32)
    zeros_t = np.zeros((B, T), np.float32)
    return Trajectories.from_numpy(dict(
        tokens=tokens, attn_mask=attn, response_mask=resp, s1_index=np.asarray(prompt_len) - 1, group_id=group,
        reward=transform_rewards(raw, group, "centered"), raw_reward=raw, ref_logp=zeros_t, ref_v=np.zeros(B),
        ref_version=np.zeros(B), sampler_logp=zeros_t, iteration=np.zeros(B)))


def one_update(graphdef, params, ref_params, batch, budget, device, lr: float):
    """One ReVal update on `device` (exact reference: both sides of δ from one forward program)
    with clip-by-global-norm 1.0 then SGD, so that each parameter moves by −lr × its clipped
    gradient (Adam's first step moves every weight by about ±lr whatever its gradient). Returns the
    host metrics and the host parameters after the step."""
    import jax
    import optax

    from reval_jax.objective import packing
    from reval_jax.objective.losses import LossNorm
    from reval_jax.objective.train_step import StepConfig, Updater, init_state

    with jax.default_device(device):
        params, ref_params = jax.device_put(params, device), jax.device_put(ref_params, device)
        optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(lr))
        state = init_state(params, optimizer, ref_dtype="bfloat16")
        state = state.replace(ref_params=ref_params)  # a reference that differs from the policy
        updater = Updater(graphdef, optimizer, StepConfig(loss="reval", beta=0.1, chunk=64), None, state)
        micro, layout = packing.pack(batch, budget)
        state, metrics = updater.update(state, micro, layout, LossNorm.for_batch(batch))
        return metrics, jax.device_get(state.params)


def stage_update_vs_cpu(ctx: Context) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import reval_jax
    from reval_jax.model.decoder import Decoder
    from reval_jax.objective import packing

    # the device's kernel against chunked on the CPU; the smoke run compares two identical CPU programs
    # (the second loads from the persistent compilation cache), the xla plumbing is the attention stage's
    impl = "cudnn" if ctx.platform == "gpu" else "chunked"
    cfg = small_config(ctx.smoke, "bfloat16", param_dtype="float32")
    if not ctx.smoke:
        cfg = cfg.replace(num_layers=2)
    B, T = (10, 32) if ctx.smoke else (16, 256)  # two micro-batches of one shape (3 or 2 rows each)
    rng = np.random.RandomState(0)
    prompt_len, response_len = rng.randint(3, T // 4, B), rng.randint(2, T // 3, B)
    batch = make_batch(prompt_len, response_len, T, cfg.vocab_size)
    budget = packing.Budget(row_len=T, micro_batches=2, max_segments=4)
    graphdef, params = nnx.split(reval_jax.create_model(cfg.replace(attention=impl), seed=0))
    cpu_graphdef = nnx.split(nnx.eval_shape(lambda: Decoder(cfg.replace(attention="chunked"), rngs=nnx.Rngs(0))))[0]
    params = jax.device_get(params)
    noise = np.random.RandomState(1)  # a reference that has drifted from the policy: weights x (1 + 0.1 N(0, 1))
    ref = jax.tree.map(lambda x: (x * (1 + 0.1 * noise.randn(*x.shape))).astype(jnp.bfloat16), params)
    lr = 1.0
    dev_m, dev_p = one_update(graphdef, params, ref, batch, budget, jax.devices()[0], lr)
    cpu_m, cpu_p = one_update(cpu_graphdef, params, ref, batch, budget, jax.devices("cpu")[0], lr)
    checks = [Check("skipped updates (device, CPU)", dev_m["skipped"] + cpu_m["skipped"], 0.0),
              relative_check("loss vs CPU", dev_m["loss"], cpu_m["loss"], BF16_TOL),
              relative_check("grad norm vs CPU", dev_m["grad_norm"], cpu_m["grad_norm"], BF16_TOL)]
    flat = lambda tree: {".".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                         for path, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(tree))}
    before, dev_p, cpu_p = flat(params), flat(dev_p), flat(cpu_p)
    # a few leaves through the whole model (not k_bias: softmax cancels its gradient, leaving rounding)
    for name in [n for n in before if n in PARAM_LEAVES]:
        checks.append(relative_check(f"step of {name} vs CPU", dev_p[name] - before[name],
                                     cpu_p[name] - before[name], 2 * BF16_TOL))
    figures = {"loss": dev_m["loss"], "loss_cpu": cpu_m["loss"], "grad_norm": dev_m["grad_norm"],
               "grad_norm_cpu": cpu_m["grad_norm"]}
    notes = [f"{B} trajectories packed into rows of {T} (2 micro-batches, <= 4 per row), "
             f"{cfg.num_params() / 1e6:.2f}M parameters, float32 master weights, bfloat16 compute and "
             f"reference; device attention {impl}, CPU attention chunked; clip 1.0 + SGD lr {lr}"]
    return {"checks": checks, "figures": figures, "notes": notes}


# ----------------------------------------------------------------------------- stage: engine throughput


def decode_bytes(cfg, slots: int, prompt_len: int, new_tokens: int, page: int, itemsize: int) -> tuple[float, float]:
    """(weight bytes, KV bytes) read by one decode step, on average over the steps: the parameters
    that multiply activations (scale_programs.matmul_params: the input embedding is a gather of B
    rows), and every slot's filled KV pages at the mean length P + A/2."""
    from reval_jax.tools.scale_programs import matmul_params

    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize  # k and v of one position
    kv = slots * per_token * page * math.ceil((prompt_len + new_tokens / 2) / page)
    return float(matmul_params(cfg) * itemsize), float(kv)


def stage_engine_throughput(ctx: Context) -> dict:
    import reval_jax
    from reval_jax.model.config import preset
    from reval_jax.rollout.engine import Engine, EngineConfig
    from reval_jax.rollout.sampler import SamplingConfig

    cfg = preset("deepseek-r1-distill-qwen-1.5b", param_dtype="bfloat16", dtype="bfloat16")
    slots, A, P, S = 256, 1024, 128, 16
    if ctx.smoke:
        cfg, slots, A, P = tiny_1p5b(cfg), 8, 16, 16
    model = reval_jax.create_model(cfg, seed=0)
    prompts = np.random.RandomState(0).randint(1, cfg.vocab_size, (slots, P)).tolist()
    config = SamplingConfig(max_new_tokens=A, temperature=1.0, buckets=(P,))
    def call(seed: int) -> tuple[float, dict, int]:  # (seconds, engine stats, tokens generated)
        engine = Engine(model, config, EngineConfig(slots=slots, page_size=S, prefill_rows=min(slots, 64)),
                        prompt_bucket=P)
        t0 = time.perf_counter()
        out = engine.run(prompts, seed=seed, prompt_ids=list(range(slots)), limits=np.full(slots, A))
        return time.perf_counter() - t0, dict(engine.stats), sum(len(t) for o in out for t, _, _ in o)

    runs = [call(0)]  # compiles
    if ctx.time_left() > 1.1 * runs[0][0]:  # the timed call, if the budget allows (it takes less than the first)
        runs.append(call(1))
    first_s, (seconds, stats, generated) = runs[0][0], runs[-1]
    step_s = stats["decode_s"] / (A - 1)  # a_1 comes from the prefill; the decode loop runs A - 1 steps
    weights, kv = decode_bytes(cfg, slots, P, A, S, itemsize=2)
    figures = {"first_call_s": first_s, "seconds": seconds, "tokens_per_s": slots * A / seconds,
               "decode_tokens_per_s": slots * (A - 1) / stats["decode_s"], "ms_per_decode_step": 1e3 * step_s,
               "weight_bytes_per_step": weights, "kv_bytes_per_step": kv}
    notes = [f"{cfg.num_params() / 1e9:.3f}B parameters, bfloat16, random weights; {slots} slots, prompts of "
             f"{P} tokens, {A} new tokens, temperature 1, no stop token; timed call {stats}"
             + ("" if len(runs) > 1 else "; NO TIME FOR A SECOND CALL: the figures include compilation")]
    if ctx.hbm_bandwidth:
        bound = (weights + kv) / ctx.hbm_bandwidth
        figures.update(bound_ms_per_decode_step=1e3 * bound, hbm_bound_fraction=bound / step_s)
    checks = [Check("every token generated (missing tokens)", float(slots * A - generated), 0.0)]
    return {"checks": checks, "figures": figures, "notes": notes}


# ----------------------------------------------------------------------------- stage: update MFU


def stage_update_mfu(ctx: Context) -> dict:
    import jax
    from flax import nnx

    import reval_jax
    from reval_jax.model.config import preset
    from reval_jax.objective import packing
    from reval_jax.objective.losses import LossNorm
    from reval_jax.objective.train_step import OptimizerConfig, StepConfig, Updater, init_state, make_optimizer
    from reval_jax.tools.scale_programs import model_flops

    cfg = preset("deepseek-r1-distill-qwen-1.5b", param_dtype="float32", dtype="bfloat16", remat="full")
    B, P, A, micro, chunk, steps = 8, 512, 7680, 8, 1024, 3
    if ctx.smoke:
        cfg, B, P, A, micro, chunk, steps = tiny_1p5b(cfg), 4, 16, 48, 2, 64, 2
    T = P + A
    batch = make_batch(np.full(B, P), np.full(B, A), T, cfg.vocab_size)
    micro_batches, layout = packing.pack(batch, packing.Budget(row_len=T, micro_batches=micro, max_segments=1))
    norm = LossNorm.for_batch(batch)
    graphdef, params = nnx.split(reval_jax.create_model(cfg, seed=0))
    optimizer = make_optimizer(OptimizerConfig())
    state = init_state(params, optimizer, ref_dtype="bfloat16")
    del params
    # reference terms read from the batch (zeros), as benchmarks/train_bench.py --gpu: no extra forwards
    updater = Updater(graphdef, optimizer, StepConfig(loss="reval", chunk=chunk, exact_reference=False), None, state)
    times, losses = [], []
    # the first call compiles, one warm-up, then timed steps while the budget allows (at least one)
    while len(times) < 2 + steps and (len(times) < 2 or ctx.time_left() > 2 * times[-1]):
        t0 = time.perf_counter()
        state, m = updater.update(state, micro_batches, layout, norm)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
        losses.append(m["loss"])
    step_s = float(np.median(times[2:] or times[1:]))
    flops = model_flops(cfg, "update", B, T, segment=T)
    figures = {"first_call_s": times[0], "seconds_per_update": step_s, "tokens_per_s": B * T / step_s,
               "model_tflops_per_update": flops / 1e12, "model_tflop_per_s": flops / step_s / 1e12}
    if ctx.peak_flops:
        figures["mfu"] = flops / step_s / ctx.peak_flops
    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("peak_bytes_in_use"):
        figures["peak_device_gib"] = stats["peak_bytes_in_use"] / 2**30
    checks = [Check("non-finite losses", float(np.sum(~np.isfinite(losses))), 0.0)]
    notes = [f"{cfg.num_params() / 1e9:.3f}B parameters, float32 master weights, bfloat16 compute, remat "
             f"{cfg.remat}; {B} x ({P} + {A}) tokens in {micro} micro-batches, chunk {chunk}; model FLOPs = "
             "scale_programs.model_flops(cfg, 'update', ...): 3 x forward, causal attention counted once, "
             f"rematerialisation not counted; median of {max(len(times) - 2, 1)} timed step(s)"]
    return {"checks": checks, "figures": figures, "notes": notes}


# ----------------------------------------------------------------------------- stage table and child


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict]
    budget_s: float  # wall-clock budget on a GPU, compilation included
    smoke_budget_s: float


STAGES = (
    Stage("attention", stage_attention, 60, 90),
    Stage("engine_greedy", stage_engine_greedy, 90, 120),
    Stage("update_vs_cpu", stage_update_vs_cpu, 90, 120),
    Stage("engine_throughput", stage_engine_throughput, 150, 120),
    Stage("update_mfu", stage_update_mfu, 150, 120),
)


def versions() -> dict:
    import importlib.metadata

    import jax

    out = {"jax": jax.__version__}
    for name in ("jaxlib", "flax", "optax"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_stage(args) -> dict:
    """In a stage process: runs one stage and returns its record (never raises)."""
    t0 = time.perf_counter()
    record = {"stage": args.stage}
    try:
        import jax

        device = jax.devices()[0]
        bandwidth, peak, source = device_spec(device.device_kind, args.cpu_smoke, args.hbm_bandwidth,
                                              args.peak_flops)
        ctx = Context(args.cpu_smoke, device.platform, device.device_kind, bandwidth, peak, source,
                      budget_s=args.budget or math.inf, start=t0)
        record.update(versions=versions(), platform=ctx.platform, device_kind=ctx.device_kind,
                      device_count=jax.device_count(), hbm_bandwidth=bandwidth, peak_flops=peak, spec_source=source)
        out = next(s for s in STAGES if s.name == args.stage).run(ctx)
        checks = [c.to_json() for c in out["checks"]]
        record.update(status="passed" if all(c["passed"] for c in checks) else "failed", checks=checks,
                      figures={k: float(v) for k, v in out["figures"].items()}, notes=out["notes"])
    except Exception as e:  # noqa: BLE001 -- recorded, and the next stage still runs
        record.update(status="error", error=f"{type(e).__name__}: {e}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
    record["seconds"] = time.perf_counter() - t0
    return record


# ----------------------------------------------------------------------------- the parent


def child_env(smoke: bool) -> dict:
    env = dict(os.environ)
    if smoke:
        env["JAX_PLATFORMS"] = "cpu"
        # programs the stages share (and a second smoke run's) load from JAX's persistent cache
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "reval_jax_device_check_cache"))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    elif env.get("JAX_PLATFORMS") and "cpu" not in env["JAX_PLATFORMS"]:
        env["JAX_PLATFORMS"] += ",cpu"  # update_vs_cpu needs the CPU backend beside the device
    return env


def launch(stage: Stage, args, timeout: float, out: Path) -> dict:
    """Runs one stage in a child process (its own process group) for at most `timeout` seconds."""
    result, log = out / f"stage_{stage.name}.json", out / f"stage_{stage.name}.log"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--stage={stage.name}", f"--result={result}",
           f"--budget={timeout}"]
    cmd += ["--cpu-smoke"] if args.cpu_smoke else []
    cmd += [f"--hbm_bandwidth={args.hbm_bandwidth}"] if args.hbm_bandwidth else []
    cmd += [f"--peak_flops={args.peak_flops}"] if args.peak_flops else []
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(args.cpu_smoke),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group
            proc.wait()
            rc = None
    seconds = time.perf_counter() - t0
    tail = log.read_text(errors="replace")[-3000:]
    if rc is None:
        return {"stage": stage.name, "status": "timeout", "seconds": seconds,
                "error": f"ran past its budget of {timeout:.0f} s and was stopped", "log_tail": tail}
    if not result.exists():
        return {"stage": stage.name, "status": "error", "seconds": seconds,
                "error": f"the stage process exited with {rc} without a result", "log_tail": tail}
    record = json.loads(result.read_text())
    record["process_seconds"] = seconds
    return record


def environment(args) -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"mode": "cpu-smoke" if args.cpu_smoke else "device",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count()}


def summarize(report: dict) -> dict:
    """Device, versions and the overall verdict from the stage records."""
    first = next((s for s in report["stages"] if "versions" in s), {})
    for key in ("versions", "platform", "device_kind", "device_count", "hbm_bandwidth", "peak_flops", "spec_source"):
        report[key] = first.get(key)
    report["all_checks_passed"] = all(s["status"] == "passed" for s in report["stages"])
    return report


def markdown(report: dict) -> str:
    v = report.get("versions") or {}
    g = lambda x: "n/a" if x is None else f"{x:.3g}"
    head = [f"# Device check ({report['mode']})", "",
            f"{report['date']}, commit {report['commit']}{' (dirty)' if report['dirty'] else ''}, host "
            f"{report['host']}; device {report.get('device_kind')} ({report.get('platform')}) x"
            f"{report.get('device_count')}; jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, flax {v.get('flax')}; "
            f"HBM {g(report.get('hbm_bandwidth'))} B/s, peak {g(report.get('peak_flops'))} FLOP/s "
            f"({report.get('spec_source')}); total {report['total_seconds']:.0f} s; all checks passed: "
            f"{report['all_checks_passed']}", "",
            "| stage | quantity | value | bound | status |", "|---|---|---|---|---|"]
    rows = []
    for s in report["stages"]:
        rows.append(f"| {s['stage']} | stage | {s['seconds']:.1f} s | | **{s['status']}** |")
        for c in s.get("checks", []):
            rows.append(f"| {s['stage']} | {c['name']} | {c['error']:.3g} | <= {c['tolerance']:.3g} | "
                        f"{'ok' if c['passed'] else 'FAILED'} |")
        for k, x in s.get("figures", {}).items():
            rows.append(f"| {s['stage']} | {k} | {x:.4g} | | |")
        if s.get("error"):
            rows.append(f"| {s['stage']} | error | {s['error'][:200].replace('|', '/')} | | |")
    return "\n".join(head + rows) + "\n"


def write(report: dict, out: Path) -> None:
    (out / "device_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "device_check.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="device_check", help="directory of device_check.json / .md")
    p.add_argument("--cpu-smoke", "--cpu_smoke", dest="cpu_smoke", action="store_true",
                   help="the same code paths at tiny shapes on CPU")
    p.add_argument("--hbm_bandwidth", "--hbm-bandwidth", type=float, default=None, help="HBM bytes/s")
    p.add_argument("--peak_flops", "--peak-flops", type=float, default=None, help="peak bf16 dense FLOP/s")
    p.add_argument("--max_seconds", "--max-seconds", type=float, default=None,
                   help="wall-clock budget of the whole check (device 460 s, smoke 400 s)")
    p.add_argument("--stages", default=",".join(s.name for s in STAGES), help="comma-separated subset")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:  # a stage process
        Path(args.result).write_text(json.dumps(run_stage(args)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = args.stages.split(",")
    unknown = set(wanted) - {s.name for s in STAGES}
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}")
    deadline = time.perf_counter() + (args.max_seconds or (400 if args.cpu_smoke else 460))
    report = {**environment(args), "stages": [], "total_seconds": 0.0}
    t0 = time.perf_counter()
    for stage in (s for s in STAGES if s.name in wanted):
        left = deadline - time.perf_counter()
        budget = min(stage.smoke_budget_s if args.cpu_smoke else stage.budget_s, left)
        print(f"[device_check] {stage.name}: budget {budget:.0f} s", flush=True)
        if budget < 15:
            record = {"stage": stage.name, "status": "skipped", "seconds": 0.0,
                      "error": f"{left:.0f} s of the check's budget left"}
        else:
            record = launch(stage, args, budget, out)
        report["stages"].append(record)
        report["total_seconds"] = time.perf_counter() - t0
        write(summarize(report), out)
        print(f"[device_check] {stage.name}: {record['status']} in {record['seconds']:.1f} s"
              + (f" -- {record['error']}" if record.get("error") else ""), flush=True)
    print(markdown(report), flush=True)
    return 0 if report["all_checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
