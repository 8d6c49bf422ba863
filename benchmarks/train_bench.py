"""Train-step throughput: the ReVal update of reval_jax (`train_step.Updater`) against `transformers` +
PyTorch.

CPU (default): the `bench` preset (Qwen2 architecture, V 32000, D 512, F 1408, 8 layers, 8 heads,
4 kv heads), float32, 16 sequences of 64 prompt + 128 response tokens, ReVal with β = 0.02 and
centered rewards, then global-norm clip 1.0 and AdamW (lr 1e-6, betas 0.9/0.999, eps 1e-8, weight
decay 0.01). PyTorch runs the same update on the same weights (ours written once with `save_hf`,
read by both sides: `load_hf` and `AutoModelForCausalLM.from_pretrained`): full logits, float32
log_softmax, per-token log π of the response tokens, V(s_1) = logsumexp at the last prompt position,

    δ = (V − V_ref) + Σ_h (log π − log π_ref) − r/β,    loss = mean δ²,

`clip_grad_norm_(1.0)` and `torch.optim.AdamW`. The reference terms come from a second random model
(a policy that has drifted from its reference) and are fed to both sides. Our side packs the batch
(`packing.pack`; no padding, so one sequence per row of T tokens) and runs `Updater.update`.

Each side runs ALONE in its own process, one after the other: the two runtimes' thread pools
(XLA's Eigen pool, PyTorch's OpenMP threads, which spin after each parallel region) would otherwise
take CPU from each other. The parent process writes the weights and the batch once (`--side=prepare`,
a subprocess too), then launches `--side=jax` and `--side=torch` (A/B, or A/B/A/B... with
`--rounds N`); every side process prints its own figures and one JSON line, and the parent checks
that all first-step losses agree (relative difference < 1e-4; a side process given the expected
loss stops before timing anything if not) and reports the median over processes of each side's
median s/step, tokens/s and the ratio:

    python benchmarks/train_bench.py --rounds 3 --steps 9 --torch-logits-to-keep   # docs/bench_train.md
    python benchmarks/train_bench.py --side=jax --steps 9             # one side alone, by hand
    python benchmarks/train_bench.py --tiny                           # smoke test, tiny shapes
    python benchmarks/train_bench.py --interleaved                    # the old design: BIASED

`--torch-logits-to-keep` adds a third side (PyTorch unembedding only the positions from s_1 on:
less work than ours, which unembeds every position). Process CPU seconds per step are printed too:
on a shared machine they show how much of the wall time was lost to contention. `--interleaved`
alternates the sides step by step in ONE process (the design of the first figures in
docs/bench_train.md); its figures are biased by the two thread pools and are labelled so.

GPU: the DeepSeek-R1-Distill-Qwen-1.5B shapes with random weights, float32 master weights and
bfloat16 compute, rematerialised layers, 512 prompt + 7680 response tokens per sequence, in
`--micro-batches` micro-batches (or `--tokens-per-device` per micro-batch); reports tokens/s and
model FLOPs utilisation

    MFU = [6·N·B·T + 12·L·T²·(N_heads·H)·B] / step seconds / peak FLOP/s

with N the matmul parameters (every weight but the input embedding table, a lookup; the untied
lm_head counted), B sequences of T tokens per step, L layers; the attention term counts the full
T×T score and value products (no causal halving) and rematerialisation is not counted:

    python benchmarks/train_bench.py --gpu --batch 8 --micro-batches 8 [--peak-flops 989e12]
    python benchmarks/train_bench.py --smoke                # the same code path, tiny, on CPU
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
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
from reval_jax.data.batch import Trajectories  # noqa: E402
from reval_jax.model.config import preset  # noqa: E402
from reval_jax.objective import packing  # noqa: E402
from reval_jax.objective.losses import LossNorm, transform_rewards  # noqa: E402
from reval_jax.objective.train_step import (  # noqa: E402
    OptimizerConfig,
    StepConfig,
    Updater,
    init_state,
    make_optimizer,
    reference_stats,
)

RESULT = "BENCH_RESULT "  # prefix of the JSON line each side process prints last
SAME_LOSS_RTOL = 1e-4

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


def with_reference(reference, ref_params, batch: Trajectories, budget: packing.Budget) -> Trajectories:
    """The batch with log π_ref and V_ref(s_1) of `ref_params`; `reference(ref_params, micro)` returns
    host lists of logp [R, L] and v [R, M] per micro-batch (`Updater.reference`)."""
    micro, layout = packing.pack(batch, budget)
    logps, vs = reference(ref_params, micro)
    arrays = batch.to_numpy()
    arrays.update(ref_logp=layout.unpack_tokens(logps), ref_v=layout.gather(vs))
    return Trajectories.from_numpy(arrays)


def jitted_reference(graphdef, cfg: StepConfig):
    """`Updater.reference` without an Updater (no optimizer state): jitted `reference_stats`."""
    fn = jax.jit(functools.partial(reference_stats, graphdef, cfg=cfg))

    def reference(ref_params, micro):
        outs = [fn(ref_params, jax.tree.map(jnp.asarray, mb)) for mb in micro]
        return [np.asarray(lp) for lp, _ in outs], [np.asarray(v) for _, v in outs]

    return reference


def make_budget(row_len: int, micro_batches: int, tokens_per_device: int) -> packing.Budget:
    """Rows of `row_len` = T tokens: the batch has no padding, so one sequence per row (M = 1)."""
    if not (micro_batches or tokens_per_device):
        micro_batches = 1
    return packing.Budget(row_len=row_len, micro_batches=micro_batches,
                          tokens_per_device=tokens_per_device, devices=1, max_segments=1)


# ----------------------------------------------------------------------------- the JAX side


class JaxSide:
    """`Updater.update` of reval_jax on the packed batch (packed once, outside the timed step);
    `step()` runs one update and returns its host metrics, wall and process CPU seconds."""

    def __init__(self, model, batch: Trajectories, cfg: StepConfig, opt_cfg: OptimizerConfig,
                 budget: packing.Budget, ref_dtype: str | None = None):
        self.graphdef, params = nnx.split(model)
        self.optimizer = make_optimizer(opt_cfg)
        self.state = init_state(params, self.optimizer, ref_dtype=ref_dtype)
        self.updater = Updater(self.graphdef, self.optimizer, cfg, None, self.state)
        self.budget = budget
        self.set_batch(batch)
        self.donation_ok: bool | None = None

    def set_batch(self, batch: Trajectories):
        t0 = time.perf_counter()
        self.micro, self.layout = packing.pack(batch, self.budget)
        self.norm = LossNorm.for_batch(batch)
        self.pack_s = time.perf_counter() - t0

    def fill_reference(self, batch: Trajectories) -> Trajectories:
        """The batch with the reference terms of this side's own reference (`state.ref_params`)."""
        batch = with_reference(self.updater.reference, self.state.ref_params, batch, self.budget)
        self.set_batch(batch)
        return batch

    def step(self) -> tuple[dict, float, float]:
        old = self.state
        t0, c0 = time.perf_counter(), time.process_time()
        self.state, metrics = self.updater.update(self.state, self.micro, self.layout, self.norm)
        jax.block_until_ready(self.state)  # the metrics are host values already
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if self.donation_ok is None:  # donated buffers are consumed: the old state is gone
            self.donation_ok = all(x.is_deleted() for x in jax.tree.leaves(old))
        return metrics, seconds, cpu

    def cache_entries(self) -> dict[str, int]:
        """jit cache entries of the update's programs (one each: nothing recompiled)."""
        u = self.updater
        return {name: fn._cache_size() for name, fn in
                (("zeros", u._zeros), ("accumulate", u.micro_step), ("apply", u.apply_step))}

    def describe(self) -> str:
        R, L, M = self.micro[0].shape
        return (f"{len(self.micro)} micro-batch(es) of {R} x {L} packed rows ({M} slot(s) per row), "
                f"{self.layout.tokens_processed} tokens processed")


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


# ----------------------------------------------------------------------------- CPU: the workload

SIDES = {"jax": "reval_jax", "torch": "transformers", "torch-keep": "transformers keep"}


def workload(args) -> dict:
    """Everything that defines the CPU benchmark's weights, batch and update (same in every process)."""
    cfg = preset("bench", remat=args.remat)
    if args.tiny:
        cfg = cfg.replace(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16)
    return dict(
        cfg=cfg, batch=args.batch, prompt_len=args.prompt_len, response_len=args.response_len,
        beta=args.beta, chunk=args.chunk, micro_batches=args.micro_batches,
        tokens_per_device=args.tokens_per_device,
    )


def describe_workload(w: dict, args) -> str:
    cfg = w["cfg"]
    T = w["prompt_len"] + w["response_len"]
    return (f"workload: {'TINY (smoke test, not a measurement) ' if args.tiny else ''}bench preset "
            f"({cfg.num_params() / 1e6:.2f}M params, float32, remat {cfg.remat}), {w['batch']} x "
            f"({w['prompt_len']} prompt + {w['response_len']} response) = {w['batch'] * T} "
            f"tokens/step, ReVal beta={w['beta']}, chunk={w['chunk']} positions per row, "
            f"micro_batches={w['micro_batches']}, tokens_per_device={w['tokens_per_device']}, "
            f"AdamW lr 1e-6 + clip 1.0; median of {args.steps} steps after {args.warmup} warm-up")


def step_config(w: dict) -> StepConfig:
    # the PyTorch side reads the reference terms stored with the batch; ours does the same work
    # (exact_reference=False: no policy/reference forwards of the exact-calibration path)
    return StepConfig(loss="reval", beta=w["beta"], chunk=w["chunk"], exact_reference=False)


def budget_of(w: dict) -> packing.Budget:
    return make_budget(w["prompt_len"] + w["response_len"], w["micro_batches"], w["tokens_per_device"])


def meta_of(w: dict) -> dict:
    return {k: (str(v) if k == "cfg" else v) for k, v in w.items()}


def prepare(args, data_dir: Path):
    """Writes the policy (HF directory `policy/`) and the batch with its reference terms
    (`batch.npz`) that every side process reads; `meta.json` records the workload."""
    w = workload(args)
    t0 = time.perf_counter()
    policy = reval_jax.create_model(w["cfg"], seed=0)
    reference = reval_jax.create_model(w["cfg"], seed=1)
    ref_graphdef, ref_params = nnx.split(reference)
    batch = make_batch(w["batch"], w["prompt_len"], w["response_len"], w["cfg"].vocab_size)
    batch = with_reference(jitted_reference(ref_graphdef, step_config(w)), ref_params, batch, budget_of(w))
    data_dir.mkdir(parents=True, exist_ok=True)
    reval_jax.save_hf(policy, None, data_dir / "policy")
    np.savez(data_dir / "batch.npz", **batch.to_numpy())
    (data_dir / "meta.json").write_text(json.dumps(meta_of(w), indent=1))
    print(f"prepared {data_dir}: policy (seed 0) as HF, batch with reference terms of seed 1, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)


def load_prepared(args, data_dir: Path) -> tuple[dict, Trajectories]:
    w = workload(args)
    meta = json.loads((data_dir / "meta.json").read_text())
    if meta != meta_of(w):
        raise SystemExit(f"{data_dir} was prepared for another workload: {meta} != {meta_of(w)}")
    with np.load(data_dir / "batch.npz") as f:
        batch = Trajectories.from_numpy(dict(f))
    return w, batch


def workload_argv(args) -> list[str]:
    """The flags that make a child process build the same workload and timing loop."""
    argv = [f"--batch={args.batch}", f"--prompt-len={args.prompt_len}",
            f"--response-len={args.response_len}", f"--beta={args.beta}", f"--chunk={args.chunk}",
            f"--micro-batches={args.micro_batches}", f"--tokens-per-device={args.tokens_per_device}",
            f"--remat={args.remat}", f"--attn={args.attn}", f"--steps={args.steps}",
            f"--warmup={args.warmup}"]
    return argv + (["--tiny"] if args.tiny else [])


def run_prepare(args, data_dir: Path):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side=prepare", f"--data-dir={data_dir}",
           *workload_argv(args)]
    subprocess.run(cmd, check=True)


# ----------------------------------------------------------------------------- CPU: one side alone


def machine_line() -> str:
    try:
        model_name = next(line.split(":", 1)[1].strip() for line in
                          subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                          if line.startswith("Model name"))
    except (OSError, StopIteration):
        model_name = platform.processor() or platform.machine()
    return (f"{model_name}, {os.cpu_count()} CPUs (nproc), this process may use "
            f"{len(os.sched_getaffinity(0))}")


def load_line() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def thread_count() -> int:
    try:
        return int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("Threads:")))
    except (OSError, StopIteration):
        return -1


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def build_side(name: str, w: dict, batch: Trajectories, data_dir: Path, args):
    opt_cfg = OptimizerConfig()  # lr 1e-6, (0.9, 0.999), eps 1e-8, wd 0.01, clip 1.0
    if name == "jax":
        model, _ = reval_jax.load_hf(data_dir / "policy", remat=w["cfg"].remat, load_tokenizer=False)
        if model.cfg != w["cfg"]:
            raise SystemExit(f"the HF round trip changed the config: {model.cfg} != {w['cfg']}")
        side = JaxSide(model, batch, step_config(w), opt_cfg, budget_of(w))
        print(f"reval_jax: {side.describe()} (packed in {side.pack_s * 1e3:.1f} ms, once, untimed)")
        return side
    return TorchSide(str(data_dir / "policy"), batch, w["beta"], opt_cfg, args.attn,
                     logits_to_keep=name == "torch-keep")


def versions(name: str) -> str:
    if name == "jax":
        return f"jax {jax.__version__} ({jax.devices()[0].platform}), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    import torch
    import transformers

    return (f"torch {torch.__version__} with {torch.get_num_threads()} threads, transformers "
            f"{transformers.__version__}")


def run_side(args, data_dir: Path) -> dict:
    """One side alone in this process: first step (checked against --expect-loss before anything is
    timed), warm-up, timed steps; prints its figures and returns them."""
    name, label = args.side, SIDES[args.side]
    if name != "jax":
        import torch

        # one intra-op thread per core this process may run on (= os.cpu_count() unless under taskset)
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    w, batch = load_prepared(args, data_dir)
    tokens = w["batch"] * (w["prompt_len"] + w["response_len"])
    load_before = os.getloadavg()
    print(f"[{label}] machine: {machine_line()}; {versions(name)}; {load_line()}")
    print(f"[{label}] {describe_workload(w, args)}", flush=True)
    side = build_side(name, w, batch, data_dir, args)

    before = len(_COMPILES)
    m, first_s, _ = side.step()
    out = {"side": name, "label": label, "loss": m["loss"], "grad_norm": m["grad_norm"],
           "first_call_s": first_s, "tokens_per_step": tokens}
    line = f"[{label}] first call {first_s:.2f} s, loss {m['loss']:.6f}, grad norm {m['grad_norm']:.6f}"
    if name == "jax":
        n, s = compile_seconds(before)
        out.update(compiles_first_call=n, compile_s=s, donation_ok=side.donation_ok)
        line += (f" ({n} XLA compilation(s), {s:.2f} s lowering + compiling); donated state "
                 f"consumed: {side.donation_ok}")
    print(line, flush=True)
    if args.expect_loss is not None:
        rel = rel_diff(m["loss"], args.expect_loss)
        out["expect_rel_diff"] = rel
        print(f"[{label}] same-loss check against {args.expect_loss:.6f}: rel diff {rel:.2e} "
              f"(< {SAME_LOSS_RTOL:g}: {rel < SAME_LOSS_RTOL})")
        if rel >= SAME_LOSS_RTOL:
            print(RESULT + json.dumps({**out, "error": "loss differs"}), flush=True)
            raise SystemExit(3)

    wall, cpu, losses = [], [], []
    before_loop = len(_COMPILES)
    for i in range(args.warmup + args.steps):
        m, s, c = side.step()
        if i >= args.warmup:
            wall.append(s)
            cpu.append(c)
        losses.append(m["loss"])
        print(f"[{label}] step {i + 2:2d}: {s:7.3f} s (cpu {c:7.3f}) loss {m['loss']:.4f}"
              + (" (warm-up)" if i < args.warmup else ""), flush=True)
    med = statistics.median(wall)
    out.update(wall_s=wall, cpu_s=cpu, losses=losses, median_s=med, tokens_per_s=tokens / med,
               median_cpu_s=statistics.median(cpu), load_before=load_before,
               load_after=os.getloadavg(), threads=thread_count(),
               torch_imported="torch" in sys.modules)
    if name == "jax":
        n, _ = compile_seconds(before_loop)
        out.update(compiles_after_first_call=n, jit_cache_entries=side.cache_entries())
        print(f"[{label}] XLA compilations after the first call: {n}; jit cache entries "
              f"{side.cache_entries()}")
    print(f"[{label}] steady {med:.3f} s/step {tokens / med:.1f} tokens/s (min {min(wall):.3f}, "
          f"max {max(wall):.3f}; process CPU {out['median_cpu_s']:.2f} s/step); {out['threads']} "
          f"threads; {load_line()}")
    print(RESULT + json.dumps(out), flush=True)
    return out


# ----------------------------------------------------------------------------- CPU: the parent


def launch_side(args, name: str, data_dir: Path, expect_loss: float | None) -> dict:
    """Runs `--side=name` in a fresh process, echoing its output; returns its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--side={name}", f"--data-dir={data_dir}",
           *workload_argv(args)]
    if expect_loss is not None:
        cmd.append(f"--expect-loss={expect_loss!r}")
    print(f"--- {SIDES[name]}: {load_line()} before", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    result = None
    for line in proc.stdout:
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
        else:
            print("    " + line, end="", flush=True)
    rc = proc.wait()
    print(f"--- {SIDES[name]}: {load_line()} after (exit {rc})", flush=True)
    if rc != 0 or result is None or "error" in result:
        raise SystemExit(f"the {SIDES[name]} process failed (exit {rc}); no figures")
    return result


def parent(args):
    names = ["jax", "torch"] + (["torch-keep"] if args.torch_logits_to_keep else [])
    if args.skip_torch:
        names = ["jax"]
    vs = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("jax", "torch", "transformers"))
    print(f"machine: {machine_line()}; {vs}; {load_line()}")
    print(f"design: each side alone in its own process, one after the other, {args.rounds} round(s) "
          f"of {' / '.join(SIDES[n] for n in names)}")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir or tmp)
        if not (data_dir / "meta.json").exists():
            run_prepare(args, data_dir)
        results: dict[str, list[dict]] = {n: [] for n in names}
        expect = None
        for _ in range(args.rounds):
            for n in names:
                r = launch_side(args, n, data_dir, expect)
                expect = r["loss"] if expect is None else expect
                results[n].append(r)

    first = results["jax"][0]
    print(f"\nsame-loss check (first step of every process, against reval_jax's first process "
          f"{first['loss']:.6f}, grad norm {first['grad_norm']:.6f}):")
    for n in names:
        for i, r in enumerate(results[n]):
            rel, rel_gn = rel_diff(r["loss"], first["loss"]), rel_diff(r["grad_norm"], first["grad_norm"])
            print(f"  {SIDES[n]:17s} process {i + 1}: loss {r['loss']:.6f} rel diff {rel:.2e} "
                  f"(< {SAME_LOSS_RTOL:g}: {rel < SAME_LOSS_RTOL}); grad norm {r['grad_norm']:.6f} "
                  f"rel diff {rel_gn:.2e}")
            if rel >= SAME_LOSS_RTOL:
                raise SystemExit("the sides do not compute the same loss; no figures")
    jr = results["jax"]
    print(f"reval_jax: XLA compilations after the first call {[r['compiles_after_first_call'] for r in jr]}, "
          f"donated state consumed {[r['donation_ok'] for r in jr]}, first call "
          f"{[round(r['first_call_s'], 2) for r in jr]} s of which lowering + compiling "
          f"{[round(r['compile_s'], 2) for r in jr]} s")

    tokens = first["tokens_per_step"]
    med = {}
    for n in names:
        per = [r["median_s"] for r in results[n]]
        med[n] = statistics.median(per)
        steps = [s for r in results[n] for s in r["wall_s"]]
        print(f"{SIDES[n]:17s} {med[n]:7.3f} s/step {tokens / med[n]:8.1f} tokens/s  (median of "
              f"{len(per)} process median(s) {[round(p, 3) for p in per]}; all steps min "
              f"{min(steps):.3f} max {max(steps):.3f}; process CPU "
              f"{statistics.median(r['median_cpu_s'] for r in results[n]):.2f} s/step)")
    for n in names[1:]:
        per_round = [t["median_s"] / j["median_s"] for t, j in zip(results[n], jr, strict=True)]
        print(f"ratio reval_jax / {SIDES[n]} (tokens/s): {med[n] / med['jax']:.2f}x (ratio of the "
              f"medians; per round {[round(x, 2) for x in per_round]})")


# ----------------------------------------------------------------------------- CPU: interleaved


def interleaved(args):
    """The first design: every side in THIS process, one step each in turn. Biased: the idle
    runtime's threads (PyTorch's OpenMP threads spin after each parallel region) and the shared
    allocator slow the other side down."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print("design: INTERLEAVED in one process -- BIASED (the two runtimes' thread pools take CPU "
          "from each other); use the default mode for figures")
    names = ["jax", "torch"] + (["torch-keep"] if args.torch_logits_to_keep else [])
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir or tmp)
        if not (data_dir / "meta.json").exists():
            prepare(args, data_dir)
        w, batch = load_prepared(args, data_dir)
        print(f"machine: {machine_line()}; {versions('jax')}; {versions('torch')}; {load_line()}")
        print(describe_workload(w, args))
        sides = {n: build_side(n, w, batch, data_dir, args) for n in names}
    tokens = w["batch"] * (w["prompt_len"] + w["response_len"])
    first = {n: s.step()[0] for n, s in sides.items()}
    for n in names:
        rel = rel_diff(first[n]["loss"], first["jax"]["loss"])
        print(f"first-step loss {SIDES[n]:17s} {first[n]['loss']:.6f} (rel diff {rel:.2e}), grad "
              f"norm {first[n]['grad_norm']:.6f}")
        if rel >= SAME_LOSS_RTOL:
            raise SystemExit("the sides do not compute the same loss; not timing them")
    wall = {n: [] for n in names}
    for i in range(args.warmup + args.steps):
        parts = []
        for n, side in sides.items():
            m, s, c = side.step()
            if i >= args.warmup:
                wall[n].append(s)
            parts.append(f"{SIDES[n]} {s:6.2f} s (cpu {c:6.2f})")
        print(f"step {i + 2:2d}: " + " | ".join(parts) + (" (warm-up)" if i < args.warmup else ""),
              flush=True)
    med = {n: statistics.median(x) for n, x in wall.items()}
    for n in names:
        print(f"INTERLEAVED (biased) {SIDES[n]:17s} {med[n]:7.3f} s/step {tokens / med[n]:8.1f} tokens/s")
    for n in names[1:]:
        print(f"INTERLEAVED (biased) ratio reval_jax / {SIDES[n]}: {med[n] / med['jax']:.2f}x; "
              f"{load_line()}")


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
    micro, tpd, steps, warmup = args.micro_batches, args.tokens_per_device, args.steps, args.warmup
    if args.smoke:
        cfg = cfg.replace(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=32)
        batch_size, prompt_len, response_len, micro, tpd, steps, warmup = 4, 16, 48, 2, 0, 2, 1
    step_cfg = StepConfig(loss="reval", beta=args.beta, chunk=args.chunk, exact_reference=False)
    T = prompt_len + response_len
    budget = make_budget(T, micro, tpd)
    tokens = batch_size * T
    flops = model_flops(cfg, batch_size, T)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}"
          f"{'  (smoke: tiny sizes, not a measurement)' if args.smoke else ''}")

    model = reval_jax.create_model(cfg, seed=0)
    batch = make_batch(batch_size, prompt_len, response_len, cfg.vocab_size)
    # reference terms from the state's bfloat16 copy of the policy (Updater.reference)
    ours = JaxSide(model, batch, step_cfg, OptimizerConfig(), budget, ref_dtype="bfloat16")
    del model
    ours.fill_reference(batch)
    print(f"model: {cfg.num_params() / 1e9:.3f}B params, float32 master weights, bfloat16 compute, "
          f"remat {cfg.remat}; batch {batch_size} x ({prompt_len} + {response_len}) = {tokens} "
          f"tokens/step in {ours.describe()}, chunk {args.chunk} positions per row, ReVal "
          f"beta={args.beta}")
    before = len(_COMPILES)
    m, first_s, _ = ours.step()
    n_compiles, compile_s = compile_seconds(before)
    print(f"first call {first_s:.1f} s ({n_compiles} compilation(s), {compile_s:.1f} s lowering + "
          f"compiling); loss {m['loss']:.4f}; donated state consumed: {ours.donation_ok}")
    times = []
    before_loop = len(_COMPILES)
    for i in range(warmup + steps):
        m, s, _ = ours.step()
        if i >= warmup:
            times.append(s)
        print(f"step {i + 2}: {s:.3f} s, loss {m['loss']:.4f}, grad norm {m['grad_norm']:.4f}"
              + (" (warm-up)" if i < warmup else ""), flush=True)
    print(f"XLA compilations after the first call: {compile_seconds(before_loop)[0]}; jit cache "
          f"entries {ours.cache_entries()}")
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
                   help="packing.Budget.micro_batches: micro-batches per update (CPU 1, GPU = batch)")
    p.add_argument("--tokens-per-device", type=int, default=0,
                   help="packing.Budget.tokens_per_device instead of --micro-batches (0 = unused)")
    p.add_argument("--chunk", type=int, default=None,
                   help="StepConfig.chunk: positions of every row per unembedding chunk (CPU 64 = the "
                        "earlier 1024-token chunks at batch 16, GPU 1024)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (7; tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first call (2; tiny 1)")
    # CPU
    p.add_argument("--side", choices=["prepare", *SIDES], default=None,
                   help="CPU: run only this side in this process (what the parent launches); "
                        "'prepare' writes --data-dir")
    p.add_argument("--data-dir", default=None,
                   help="CPU: directory of the prepared weights and batch (default: a temporary one, "
                        "prepared first)")
    p.add_argument("--expect-loss", type=float, default=None,
                   help="CPU side: stop before timing unless the first-step loss matches this")
    p.add_argument("--rounds", type=int, default=1, help="CPU: A/B rounds of separate processes")
    p.add_argument("--interleaved", action="store_true",
                   help="CPU: the old design, both sides alternating in ONE process (biased)")
    p.add_argument("--tiny", action="store_true", help="CPU: tiny shapes, a smoke test of the CPU path")
    p.add_argument("--prompt-len", type=int, default=None, help="CPU: 64 (tiny 8)")
    p.add_argument("--response-len", type=int, default=None, help="CPU: 128 (tiny 24)")
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
        args.batch = 8 if gpu else (4 if args.tiny else 16)
    if args.micro_batches is None:
        args.micro_batches = 0 if args.tokens_per_device else (args.batch if gpu else 1)
    if args.chunk is None:
        args.chunk = 1024 if gpu else 64
    if args.prompt_len is None:
        args.prompt_len = 8 if args.tiny else 64
    if args.response_len is None:
        args.response_len = 24 if args.tiny else 128
    if args.steps is None:
        args.steps = 3 if args.tiny else 7
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    if gpu:
        gpu_bench(args)
    elif args.side == "prepare":
        prepare(args, Path(args.data_dir))
    elif args.side is not None:
        if args.data_dir:
            run_side(args, Path(args.data_dir))
        else:  # by hand: prepare the same weights and batch in a separate process first
            with tempfile.TemporaryDirectory() as tmp:
                run_prepare(args, Path(tmp))
                run_side(args, Path(tmp))
    elif args.interleaved:
        interleaved(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
