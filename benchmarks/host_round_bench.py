"""The host side of one paper round at full size: everything the trainer does on the CPU, timed.

    python benchmarks/host_round_bench.py --shape=7b       # configs/qwen7b.py: ~600-token responses, 3,072 cap
    python benchmarks/host_round_bench.py --shape=1p5b     # configs/dpsk_r1_distill_1p5b.py: ~5,000, 8,192 cap
    python benchmarks/host_round_bench.py --shape=both --out=docs/host_round.json

One round of 128 prompts x 8 samples (1,024 rollouts) goes through the project's own functions in
the order the trainer calls them (reval_jax/run/producer.py, run/trainer.py): detokenize
(`evaluate.decode_responses`, the char tokenizer of reval_jax.model.tokenizer: one token per
character), score (`evaluate.score_rollout` through a `RewardScorer` with the config's workers and
timeout; model-style responses: reasoning ending in \\boxed{}, nested LaTeX, equivalent-but-different
forms, wrong answers, truncated responses, and `--adversarial` answers that make sympy slow or hang),
build the Trajectories (`Rollout.to_trajectories`, `pad_to`), transform the rewards (the algorithm's
`Rewarding.rewards`), the reference pass's host side (`pack`, `Layout.unpack_tokens` / `gather` of
device outputs stood in by zeros: the forward itself is device work), add to the 5,120-trajectory
`ReplayBuffer` (full: it evicts, as in steady state), the K = 2 updates' host side (pack the fresh
round; draw 1,024 from the buffer and pack them; `LossNorm.for_batch`), write the round's metrics
(`MetricsWriter`: JSONL + TensorBoard) and checkpoint the buffer (`Checkpointer.save` of
`ReplayBuffer.state_dict()`, with a one-scalar stand-in for the train state, then the background write).
Device work (sampling, forward, backward) is not timed. The JSON holds seconds per stage, the peak
RSS of this process and of the scorer's workers, and the checkpoint's size and times.

Then the same round is scored as the trainer scores it where a process scores its own rows: row by
row as the engine finishes them, beside the decoding (`streamed_scoring`; the device stood in by
`--generation_s` of sleep), reporting the tail that stays on the critical path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `configs`

from configs import dpsk_r1_distill_1p5b, qwen7b  # noqa: E402
from reval_jax.data.replay import ReplayBuffer  # noqa: E402
from reval_jax.data.rewards import RewardScorer  # noqa: E402
from reval_jax.model.tokenizer import build_char_tokenizer  # noqa: E402
from reval_jax.objective import algorithms  # noqa: E402
from reval_jax.objective.losses import LossNorm  # noqa: E402
from reval_jax.objective.packing import pack  # noqa: E402
from reval_jax.rollout.sampling import Rollout, bucket_length  # noqa: E402
from reval_jax.run import config as run_config  # noqa: E402
from reval_jax.run.evaluate import decode_responses, score_rollout  # noqa: E402
from reval_jax.run.trainer import staleness_of  # noqa: E402

DEVICES = 8  # data-parallel devices of the update (one 8-accelerator host: the paper's)
SHAPES = {"7b": (qwen7b, 600.0), "1p5b": (dpsk_r1_distill_1p5b, 5000.0)}  # config, mean response tokens
SIGMA = 0.7  # log-normal spread of response lengths (7B: 0.4% reach the cap; 1.5B: 14%)

# (ground truth, answers a sample gives: correct forms first, then wrong ones)
ANSWERS = [
    ("42", ["42", "42.0", "41", "24"]),
    ("\\frac{\\sqrt{2}}{3}", ["\\frac{\\sqrt{2}}{3}", "\\frac{2\\sqrt{2}}{6}", "\\frac{\\sqrt{3}}{2}", "\\sqrt{2}/4"]),
    ("2\\pi", ["2\\pi", "\\pi \\cdot 2", "\\pi", "4\\pi"]),
    ("(-\\infty, 3]", ["(-\\infty,3]", "(-\\infty, 3]", "(-\\infty, 3)", "[3, \\infty)"]),
    ("x^2+2x+1", ["(x+1)^2", "x^2+2x+1", "x^2+1", "(x-1)^2"]),
    ("\\frac{1}{2}", ["0.5", "\\frac{1}{2}", "\\frac{1}{3}", "\\dfrac{2}{3}"]),
    ("(1, 2)", ["(1,2)", "(1, 2)", "(2, 1)", "(1, 3)"]),
    ("\\sqrt[3]{5}+\\frac{\\sqrt{7}}{\\sqrt{2}}",
     ["\\sqrt[3]{5}+\\frac{\\sqrt{14}}{2}", "\\frac{\\sqrt{7}}{\\sqrt{2}}+5^{1/3}", "\\sqrt{5}+\\sqrt{7}", "3"]),
]
# answers that make sympy slow (the nested ones: ~0.3-1 s) or hang (until the scorer's timeout)
ADVERSARIAL = [
    "2^{2^{2^{2^{2^{10}}}}}",
    "10^{10^{10^{10}}}",
    "(x+1)^{100000}",
    "1000000!",
    "+".join(f"x^{{{i}}}" for i in range(2000)),
    "".join("\\frac{1}{1+" for _ in range(60)) + "x" + "}}" * 60,
    "".join("\\sqrt{2+" for _ in range(60)) + "2" + "}" * 60,
]
REASONING = (
    "Let $f(x) = \\frac{x^2 - 4}{x + 2}$. For $x \\neq -2$ we can cancel, so $f(x) = x - 2$. "
    "Now substitute $x = \\sqrt{2}$: we get $\\sqrt{2} - 2$, and squaring gives $(\\sqrt{2}-2)^2 = 6 - 4\\sqrt{2}$. "
    "Wait, let me double-check the discriminant: $\\Delta = b^2 - 4ac = 9 - 8 = 1 > 0$, so two real roots. "
    "Hmm, alternatively, by Vieta, $r_1 + r_2 = -\\frac{b}{a}$ and $r_1 r_2 = \\frac{c}{a}$. "
    "Summing the series $\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}$ with $n = 12$ gives $78$.\n\n"
)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    config: object  # the run config (ml_collections)
    mean_tokens: float

    @property
    def cap(self) -> int:
        return int(self.config.sampling.max_new_tokens)

    @property
    def template(self) -> str:
        return self.config.data.template


def response_ids(tokenizer, shape: Shape, rng: np.random.Generator, answer: str) -> tuple[list[int], bool]:
    """One response of a log-normal length: reasoning, then the final answer (after </think> for
    r1_distill), then the stop token; cut at the cap without a stop token (truncated)."""
    mu = math.log(shape.mean_tokens) - SIGMA**2 / 2
    length = max(16, int(rng.lognormal(mu, SIGMA)))
    close = "\n</think>\n\n" if shape.template == "r1_distill" else "\n\n"
    tail = tokenizer.encode(f"{close}So the final answer is $\\boxed{{{answer}}}$.", add_special_tokens=False)
    filler = _filler_ids(tokenizer)
    body = max(0, length - len(tail))
    start = int(rng.integers(0, len(filler) - body)) if body < len(filler) else 0
    ids = (filler * (body // len(filler) + 1))[start : start + body] + tail + [tokenizer.eos_token_id]
    return (ids[: shape.cap], True) if len(ids) > shape.cap else (ids, False)


_FILLER: list[int] = []


def _filler_ids(tokenizer) -> list[int]:
    if not _FILLER:
        _FILLER.extend(tokenizer.encode(REASONING * 120, add_special_tokens=False))
    return _FILLER


def make_round(tokenizer, shape: Shape, prompts: int, samples: int, adversarial: int, seed: int):
    """(Rollout of prompts x samples rows as the engine returns it, ground truths [prompts])."""
    rng = np.random.default_rng(seed)
    R, A = prompts * samples, shape.cap
    prompt_lens = np.clip(rng.lognormal(math.log(180), 0.5, prompts).astype(int), 32, shape.config.data.max_prompt_len)
    P = bucket_length(int(prompt_lens.max()), tuple(shape.config.sampling.buckets))
    golds, rows, truncated = [], [], []
    bad = set(rng.choice(R, size=adversarial, replace=False).tolist())
    for b in range(prompts):
        gold, forms = ANSWERS[b % len(ANSWERS)]
        golds.append(gold)
        for n in range(samples):
            i = b * samples + n
            answer = ADVERSARIAL[len(rows) % len(ADVERSARIAL)] if i in bad else forms[int(rng.integers(len(forms)))]
            ids, cut = response_ids(tokenizer, shape, rng, answer)
            rows.append(ids)
            truncated.append(cut)
    prompt_tokens = np.zeros((R, P), np.int32)
    prompt_mask = np.zeros((R, P), bool)
    for i in range(R):
        n = int(prompt_lens[i // samples])
        prompt_tokens[i, P - n :] = rng.integers(262, 350, n)
        prompt_mask[i, P - n :] = True
    response = np.zeros((R, A), np.int32)
    for i, ids in enumerate(rows):
        response[i, : len(ids)] = ids
    lengths = np.array([len(ids) for ids in rows], np.int32)
    mask = np.arange(A)[None, :] < lengths[:, None]
    rollout = Rollout(
        prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, response_tokens=response, response_mask=mask,
        response_length=lengths, truncated=np.array(truncated), group_id=np.repeat(np.arange(prompts, dtype=np.int32),
                                                                                  samples),
        logp=np.where(mask, -rng.exponential(0.3, (R, A)), 0.0).astype(np.float32),
        version=np.where(mask, 0, -1).astype(np.int32))
    return rollout, golds


class Timer:
    """Seconds per named stage, in order."""

    def __init__(self):
        self.stages: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.stages[name] = timer.stages.get(name, 0.0) + time.perf_counter() - self.t0

        return _Span()


def fill_buffer(buffer: ReplayBuffer, batch, rounds: int) -> None:
    """The buffer as in steady state: full of earlier rounds (the same rows, earlier iterations)."""
    for i in range(rounds):
        buffer.add(batch.replace(iteration=np.full(batch.batch_size, i, np.int32)))


def host_round(shape: Shape, scorer: RewardScorer, tokenizer, args, workdir: Path) -> dict:
    """Times one round's host work (module docstring); returns the stages and the checkpoint's figures."""
    from reval_jax.run.checkpoint import Checkpointer
    from reval_jax.run.metrics import MetricsWriter

    c = shape.config
    seq_len = run_config.sequence_length(c)
    budget = run_config.packing_budget(c, types.SimpleNamespace(shape={"data": 1, "fsdp": DEVICES}))
    rewarding = run_config.rewarding(c)
    advantages = algorithms.get(c.algorithm).batch_advantages
    rollout, golds = make_round(tokenizer, shape, args.prompts, args.samples, args.adversarial, args.seed)
    buffer = ReplayBuffer(c.replay.capacity, seq_len, seed=c.seed)
    iteration, t = c.replay.capacity // (args.prompts * args.samples), Timer()
    with t("detokenize"):
        decode_responses(tokenizer, rollout)
    with t("score"):  # decode + math-verify in the workers: evaluate.score_rollout, after generation
        raw = score_rollout(scorer, tokenizer, rollout, golds, shared=True)
    t.stages["score"] -= t.stages["detokenize"]  # the decode inside score_rollout, counted once
    streamed = streamed_scoring(shape, scorer, tokenizer, rollout, golds, args) if args.generation_s > 0 else None
    if streamed is not None:  # a timeout scores 0: an answer near the limit may fall either side
        streamed["rewards_differ"] = int(np.sum(streamed.pop("raw") != raw))
    with t("trajectories"):
        batch = rollout.to_trajectories(iteration=iteration, pad_id=0).pad_to(seq_len)
    with t("rewards"):  # Producer._rewarded
        lengths = np.asarray(batch.response_mask).sum(1)
        reward = rewarding.rewards(raw, np.asarray(batch.group_id), lengths)
        batch = batch.replace(raw_reward=raw, reward=np.asarray(reward, np.float32))
    with t("reference_pack"):  # Learner.fill_reference around the device's reference forward
        micro, layout = pack(batch, budget)
        logps = [m.sampler_logp * np.float32(1.01) for m in micro]  # the device's reference log-probs
        vs = [np.zeros(m.valid.shape, np.float32) for m in micro]
        batch = batch.replace(ref_logp=layout.unpack_tokens(logps), ref_v=layout.gather(vs).astype(np.float32),
                              ref_version=np.zeros(batch.batch_size, np.int32))
    fill_buffer(buffer, batch, iteration)  # untimed: the earlier rounds
    with t("buffer_add"):
        buffer.add(batch)
    with t("update_pack"):  # update 0 (on_policy_first): the fresh round
        staleness_of(batch, 0)
        pack(batch, budget, weights=np.ones(batch.batch_size, np.float32), advantages=advantages(batch))
        LossNorm.for_batch(batch, c.sampling.max_new_tokens)
    with t("buffer_sample"):  # update 1: a draw from the buffer (reference terms current: none recomputed)
        sample = buffer.sample(args.prompts * args.samples, iteration=iteration, ref_version=0)
    with t("update_pack"):
        staleness_of(sample.batch, 1)
        micro, _ = pack(sample.batch, budget, weights=sample.weights, advantages=advantages(sample.batch))
        LossNorm.for_batch(sample.batch, c.sampling.max_new_tokens)
    writer = MetricsWriter(workdir / "run", stream=open(os.devnull, "w"))  # the run opens it once
    with t("metrics"):
        writer.write("train", iteration, round_record(batch, raw, rollout, buffer), echo=("accuracy",))
    writer.close()
    return {"stages": t.stages, "raw_accuracy": float(np.mean(raw)), "micro_batches": len(micro),
            "rows_per_micro_batch": int(micro[0].tokens.shape[0]), "seq_len": seq_len,
            "truncated": int(np.asarray(rollout.truncated).sum()),
            "mean_response_tokens": float(np.asarray(rollout.response_length).mean()),
            "checkpoint": checkpoint(buffer, Checkpointer(workdir / "checkpoints", keep=3), iteration),
            "buffer_bytes": int(sum(a.nbytes for a in buffer.state_dict().values())),
            "verifier": dataclasses.asdict(scorer.stats), "streamed": streamed}


def streamed_scoring(shape: Shape, scorer: RewardScorer, tokenizer, rollout, golds, args) -> dict:
    """Scoring as the trainer runs it where a process scores its own rows (run/producer.py): each row
    handed to EnvTurns(SingleTurn) as the engine finishes it, scored on a thread while the device
    decodes the rest. The device is stood in by sleeping: the round's `--generation_s` (the paper's
    36.8 s per round at 7B) spread over decode calls of `--call_s`, rows finishing in the order and
    at the times of their lengths (tokens come at a constant rate; the longest rows end last).
    Returns the tail (from the last row's finish to the last score: what stays on the critical path),
    the host seconds spent in this thread meanwhile, and the rewards (to compare with score_rollout's)."""
    from reval_jax.env.base import EnvConfig, SingleTurn
    from reval_jax.env.rollout import EnvTurns
    from reval_jax.rollout.scheduler import Parked

    samples = args.samples
    lengths = np.asarray(rollout.response_length)
    order = np.argsort(lengths, kind="stable")
    finish = args.generation_s * np.cumsum(lengths[order]) / lengths.sum()  # when each row ends
    examples = [types.SimpleNamespace(id=str(b), problem="", answer=g) for b, g in enumerate(golds)]
    env = SingleTurn(EnvConfig(max_turns=1, max_tokens=shape.cap), tokenizer, scorer)
    turns = EnvTurns(env, examples, tokenizer, vocab_size=len(tokenizer))
    tokens = np.asarray(rollout.response_tokens)
    start, host, sent, call = time.perf_counter(), 0.0, 0, 1
    while sent < len(order):
        time.sleep(max(0.0, start + call * args.call_s - time.perf_counter()))  # the device's decode call
        t0 = time.perf_counter()
        due = int(np.searchsorted(finish, call * args.call_s, side="right"))
        turns.submit([Parked((int(i) // samples, int(i) % samples), tokens[i, : lengths[i]], None, None, None, 0, None)
                      for i in order[sent:due]])
        turns.ready(wait=False)
        sent, call = due, call + 1
        host += time.perf_counter() - t0
    last = time.perf_counter()
    turns.close()
    tail = time.perf_counter() - last
    raw = np.asarray([turns.episodes[(i // samples, i % samples)].reward for i in range(len(lengths))], np.float32)
    return {"generation_s": args.generation_s, "call_s": args.call_s, "tail_s": tail, "host_s_in_loop": host,
            "wall_s": time.perf_counter() - start, "raw": raw}


def round_record(batch, raw, rollout, buffer) -> dict[str, float]:
    """The round's train record as Trainer.round_metrics makes it (the update's scalars stood in)."""
    lengths = np.asarray(batch.response_mask).sum(1)
    record = {f"update_scalar_{i}": 0.0 for i in range(24)}
    record.update(reward_mean=float(np.mean(batch.reward)), accuracy=float(np.mean(raw)),
                  response_length=float(np.mean(lengths)),
                  truncation_rate=float(np.mean(np.asarray(rollout.truncated))),
                  **{f"buffer_{k}": v for k, v in buffer.stats().items()})
    return record


def checkpoint(buffer: ReplayBuffer, ckpt, iteration: int) -> dict[str, float]:
    """CheckpointHook's save of the buffer: state_dict, Checkpointer.save (fingerprints, the copy Orbax
    makes before returning), then the background write (Checkpointer.wait)."""
    import jax.numpy as jnp

    state = {"step": jnp.zeros((), jnp.int32)}  # the train state is device work: a stand-in
    t0 = time.perf_counter()
    tree = buffer.state_dict()
    t1 = time.perf_counter()
    ckpt.save(iteration, state, tree, {"data": {}, "verifier": {}}, log=lambda *a: None)
    t2 = time.perf_counter()
    ckpt.wait()
    t3 = time.perf_counter()
    ckpt.close()
    step = ckpt.directory / str(iteration)
    size = int(subprocess.run(["du", "-sb", str(step / "buffer")], capture_output=True, text=True,
                              check=True).stdout.split()[0])
    return {"state_dict_s": t1 - t0, "save_call_s": t2 - t1, "background_write_s": t3 - t2,
            "size_bytes": size}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_rss_mb() -> float:
    """Proportional set size (shared pages split between the sharers) of this process's descendants:
    the scorer's workers, its standby workers and the forkserver."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    return sum(p.memory_full_info().pss for p in psutil.Process().children(recursive=True)) / 2**20


def run(shape_name: str, args) -> dict:
    config_module, mean = SHAPES[shape_name]
    config = config_module.get_config()
    algorithms.apply_defaults(config)
    shape = Shape(shape_name, config, mean)
    tokenizer = build_char_tokenizer()
    workdir = Path(tempfile.mkdtemp(prefix=f"host_round_{shape_name}_", dir=args.tmp))
    try:
        workers = args.workers or config.reward.num_workers
        timeout = args.timeout or config.reward.timeout_s
        with RewardScorer(config.reward.name, template=shape.template, num_workers=workers,
                          timeout_s=timeout) as scorer:
            scorer.score([("\\boxed{1}", "1")] * workers)  # the workers started (a run starts them once)
            out = host_round(shape, scorer, tokenizer, args, workdir)
            out["worker_rss_mb"] = worker_rss_mb()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stages = out["stages"]
    out.update(shape=shape_name, config=config_module.__name__, workers=workers, timeout_s=timeout,
               adversarial=args.adversarial, rollouts=args.prompts * args.samples,
               total_s=sum(stages.values()), peak_rss_mb=peak_rss_mb())
    return out


def show(result: dict) -> str:
    s, ck = result["stages"], result["checkpoint"]
    lines = [f"{result['shape']} ({result['config']}): {result['rollouts']} rollouts, mean response "
             f"{result['mean_response_tokens']:.0f} tokens, {result['truncated']} truncated, seq_len "
             f"{result['seq_len']}, {result['adversarial']} adversarial, {result['workers']} workers x "
             f"{result['timeout_s']:g} s timeout, accuracy {result['raw_accuracy']:.3f}"]
    lines += [f"  {name:16s} {sec:8.3f} s" for name, sec in s.items()]
    lines.append(f"  {'total':16s} {result['total_s']:8.3f} s   (peak RSS {result['peak_rss_mb']:.0f} MB; "
                 f"workers {result['worker_rss_mb']:.0f} MB PSS)")
    lines.append(f"  checkpoint of the buffer: {ck['size_bytes'] / 1e6:.0f} MB on disk "
                 f"({result['buffer_bytes'] / 1e6:.0f} MB in memory); state_dict {ck['state_dict_s']:.2f} s, "
                 f"save call {ck['save_call_s']:.2f} s, background write {ck['background_write_s']:.2f} s")
    lines.append(f"  verifier: {result['verifier']}")
    if result.get("streamed"):
        st = result["streamed"]
        lines.append(f"  scored as rows finish (device stood in by {st['generation_s']:g} s of decode calls of "
                     f"{st['call_s']:g} s): tail after the last row {st['tail_s']:.2f} s, host work in the loop "
                     f"{st['host_s_in_loop']:.2f} s, rewards unlike score_rollout's: {st['rewards_differ']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=(*SHAPES, "both"), default="both")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--adversarial", type=int, default=7, help="answers that make sympy slow or hang")
    parser.add_argument("--workers", type=int, default=0, help="verifier processes (0: config.reward.num_workers)")
    parser.add_argument("--timeout", type=float, default=0.0, help="per-answer seconds (0: config.reward.timeout_s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generation_s", type=float, default=36.8,
                        help="the round's device time for streamed scoring (0: skip it; the paper's 7B: 36.8 s)")
    parser.add_argument("--call_s", type=float, default=0.5, help="streamed scoring: seconds per decode call")
    parser.add_argument("--tmp", default=None, help="where the checkpoint is written (default: the system's temp)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    results = [run(name, args) for name in (SHAPES if args.shape == "both" else [args.shape])]
    for r in results:
        print(show(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
