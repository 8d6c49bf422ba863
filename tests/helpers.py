"""Shared test helpers: the tiny local tokenizer and the paths of the shared data files.

Other test modules import from here (``from helpers import tiny_tokenizer``); keep the names stable.
"""

from __future__ import annotations

import functools
import os

from reval_jax.model.tokenizer import build_char_tokenizer

# shared/ sits beside the checkout (../shared from the repository root), here and in CI
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH_DATA_DIR = os.environ.get(
    "REVAL_MATH_DATA", os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "math")
)

# The hang guard of every test that waits on a subprocess or a condition: only a hung command gets
# this far. Not a performance bound: a loaded machine that is slow to import and compile never
# reaches it.
HANG_S = 1800


@functools.cache
def tiny_tokenizer():
    """The project's character tokenizer (ChatML chat template), built once per test process.

    Shared: do not mutate it; build a fresh one with ``build_char_tokenizer()`` to change it.
    """
    return build_char_tokenizer()


def save_tiny_tokenizer(directory: str | os.PathLike) -> str:
    """Saves ``tiny_tokenizer()`` to ``directory`` (``AutoTokenizer.from_pretrained`` loads it)."""
    tiny_tokenizer().save_pretrained(directory)
    return os.fspath(directory)


def math_data_file(name: str) -> str:
    """Path of a file of the shared math data set, e.g. ``math_data_file("gsm8k_test.jsonl")``."""
    return os.path.join(MATH_DATA_DIR, name)


def write_arith_data(path, n: int = 24, seed: int = 0) -> str:
    """A tiny JSONL prompt file of sums (plus one bad row without a problem)."""
    import json

    import numpy as np

    rng = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 20, 2)
        rows.append({"id": str(i), "problem": f"{a}+{b}=?", "answer": str(a + b), "source": "t"})
    rows.append({"id": "bad", "problem": "", "answer": "1", "source": "t"})  # skipped and counted
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def tiny_config(data_file, **overrides):
    """A run config of a few seconds per iteration: tiny random model, tiny data, 1 device."""
    from models import tokenizer_model_dir

    from configs import base

    c = base.get_config()
    c.model.path = str(tokenizer_model_dir())
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.mesh = (1, 1, 1)
    c.num_iterations = 3
    c.data.train_files = (data_file,)
    c.data.template = "plain"
    c.data.max_prompt_len = 60
    c.data.prompts_per_iteration = 2
    c.sampling.num_samples = 4
    c.sampling.max_new_tokens = 12
    c.sampling.buckets = (64,)
    c.replay.capacity = 16
    c.reward.num_workers = 1
    c.reward.timeout_s = 30.0
    c.optimizer.learning_rate = 1e-3
    c.eval.every = 0  # tests that evaluate turn it on
    c.eval.files = (data_file,)
    c.eval.limit = 3
    c.eval.k = 2
    c.progress = False
    c.chunk = 64
    c.tokens_per_device = 76  # one packed row (bucket 64 + 12) per device: one compiled shape per run
    c.checkpoint.every = 1
    c.checkpoint.async_save = True
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return c


TIMING_SUFFIXES = ("seconds", "_s", "tokens_per_s", "_busy")


def metric_records(workdir) -> list[dict]:
    """A run's metrics.jsonl records without wall-clock fields (which differ between equal runs)."""
    import json
    from pathlib import Path

    out = []
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if not k.endswith(TIMING_SUFFIXES)})
    return out


def tb_scalars(workdir) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in every event file of `workdir/tb`, read back from the
    TFRecord framing (u64 length, u32 crc, Event proto, u32 crc)."""
    import struct
    from pathlib import Path

    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted((Path(workdir) / "tb").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + n])
            at += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


class InlineScorer:
    """A `RewardScorer` without worker processes: the named reward called in this process, for the
    end-to-end tests whose reward path is not under test (`train.run(config, workdir, scorer=...)`).
    Its rewards are the worker's (the same function); it never times out."""

    def __init__(self, name: str = "math", template: str = "plain"):
        import threading

        from reval_jax.data.rewards import RewardStats, resolve_reward

        self.fn, self.template = resolve_reward(name), template
        self._stats = RewardStats(0, 0, 0, 0)
        self._lock = threading.Lock()  # the rollout thread and the evaluation may score at once

    @property
    def stats(self):
        return self._stats

    def restore_stats(self, stats) -> None:
        self._stats = stats

    def score(self, pairs) -> list[float]:
        import dataclasses

        with self._lock:
            self._stats = dataclasses.replace(self._stats, scored=self._stats.scored + len(pairs))
            return [float(self.fn(response, answer, self.template)) for response, answer in pairs]

    def close(self) -> None:
        pass


_REFERENCE_RUNS: dict[tuple, object] = {}


def reference_run(tmp_path_factory, data_file, **overrides):
    """The workdir of the uninterrupted run of `tiny_config(data_file, **overrides)`, made once per
    test session and shared by every module that compares against it (do not write into it: copy it)."""
    from reval_jax.run import train

    key = (str(data_file), tuple(sorted((k, repr(v)) for k, v in overrides.items())))
    if key not in _REFERENCE_RUNS:
        workdir = tmp_path_factory.mktemp("reference")
        train.run(tiny_config(data_file, **overrides), str(workdir), scorer=InlineScorer())
        _REFERENCE_RUNS[key] = workdir
    return _REFERENCE_RUNS[key]


def _letter_env():
    import string

    from reval_jax.env.base import Environment, Stops, ToolCall, ToolResult

    class LetterEnv(Environment):
        """A test environment for the random tiny model: a turn ends at any lowercase letter (a stop
        string of one character, frequent in random text) and that letter "calls" a tool answered
        with "=1"; a turn that ends otherwise (a stop id, the budget) ends the episode."""

        def stops(self):
            return Stops(super().stops().token_ids, tuple(string.ascii_lowercase))

        def parse(self, turn_tokens, turn_text):
            return [ToolCall("echo", turn_text[-1])] if turn_text and turn_text[-1].islower() else []

        def run_tools(self, calls):
            return [ToolResult("1") for _ in calls]

        def observation_text(self, turn_tokens, turn_text, results):
            return "=1"

    return LetterEnv


LetterEnv = _letter_env()  # "helpers:LetterEnv" in a run config's env.name
