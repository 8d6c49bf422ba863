"""Evaluation: avg@k per benchmark, their average, response length and truncation rate.

    python -m reval_jax.evaluate --config=configs/qwen7b.py [--hf=DIR | --checkpoint=DIR] [--greedy] [--out=FILE]

The same `evaluate` function runs inside training every `eval.every` iterations; both hand it the
policy in the rollout layout (`reval_jax.rollout.layout`, config.rollout.*). avg@k is the mean
correctness over k samples per problem, averaged over the problems of a benchmark (ALGORITHMS.md,
Evaluation protocol); "avg@k" alone is the mean over benchmarks.

Sampling follows `eval.k` and `eval.temperature`; temperature 0 decodes greedily (the most likely
token at every step: deterministic, so the k samples of a problem are the same). `--greedy` is one
greedy answer per problem, `--config.eval.temperature=0 --config.eval.k=1`: its key is "avg@1".
With `--checkpoint`, a step that does not load (or does not match its checksums) is named in one
line with the reason, and the newest usable one is evaluated. Progress bars (config.progress) are
shown on a terminal only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from reval_jax.data.prompts import LoadOptions, PromptExample, load_eval_set
from reval_jax.data.rewards import RewardScorer
from reval_jax.env.base import Environment, get_environment
from reval_jax.env.rollout import EnvTurns, episode_metrics
from reval_jax.errors import UserError
from reval_jax.parallel.distributed import all_gather_rows, process_share, to_host
from reval_jax.rollout.sampler import Rollout, SamplingConfig, generate
from reval_jax.run.config import DataSettings, EvalSettings
from reval_jax.run.metrics import show_bars


def decode_responses(tokenizer, rollout: Rollout, rows: slice = slice(None)) -> list[str]:
    """Response texts of `rows` without the stop token and padding (special tokens dropped)."""
    tokens = to_host(rollout.response_tokens)[rows]
    lengths = to_host(rollout.response_length)[rows]
    truncated = to_host(rollout.truncated)[rows]
    texts = []
    for row, n, cut in zip(tokens, lengths, truncated, strict=True):
        keep = row[:n] if cut else row[: max(n - 1, 0)]
        texts.append(tokenizer.decode(keep.tolist(), skip_special_tokens=True))
    return texts


def score_rollout(scorer: RewardScorer, tokenizer, rollout: Rollout, answers: Sequence[str], *,
                  shared: bool = True, devices: Sequence[jax.Device] | None = None) -> np.ndarray:
    """0/1 rewards [B·N] of a rollout whose prompt b has ground truth `answers[b]`.

    shared: every process holds the same rollout; each scores its share of the rows and every
    process gets all the scores (gathered on one of `devices` per process, default any). Not
    shared: the rollout is this process's own (its own rollout group's, async on several
    processes); it scores every row itself, with no communication."""
    total = to_host(rollout.response_length).shape[0]
    samples = total // len(answers)
    rows = process_share(total) if shared else slice(0, total)
    texts = decode_responses(tokenizer, rollout, rows)
    pairs = [(t, answers[(rows.start + i) // samples]) for i, t in enumerate(texts)]
    local = np.asarray(scorer.score(pairs) if pairs else [], np.float32)
    return all_gather_rows(local, total, devices) if shared else local


def evaluate(model, tokenizer, benchmarks: dict[str, list[PromptExample]], settings: EvalSettings,
             scorer: RewardScorer, *, progress: bool = False, env: Environment | None = None) -> dict[str, float]:
    """avg@k, mean response length and truncation rate per benchmark, and the average avg@k. With an
    environment (multi-turn episodes, `env`), each sample is an episode scored as the environment
    ends it, and the episodes' figures (turns, tool calls, ...) are reported per benchmark too."""
    from tqdm import tqdm

    config = SamplingConfig(max_new_tokens=settings.max_new_tokens, num_samples=settings.k,
                            temperature=settings.temperature, greedy=settings.greedy, stop_ids=settings.stop_ids,
                            buckets=settings.buckets)
    results: dict[str, float] = {}
    key = f"avg@{settings.k}"
    scoring = _Scoring(scorer, tokenizer, env, model)
    for name, examples in benchmarks.items():
        correct, lengths, truncated, episodes = [], [], [], []
        chunks = range(0, len(examples), settings.prompts_per_call)
        for start in tqdm(chunks, desc=f"eval {name}", disable=not show_bars(progress), leave=False):
            batch = examples[start : start + settings.prompts_per_call]
            turns = scoring.turns(batch)
            rollout = generate(model, [e.prompt_ids for e in batch], config, seed=settings.seed, engine=settings.engine,
                               prompt_ids=list(range(start, start + len(batch))), turns=turns)
            correct.append(scoring.score(rollout, batch, turns, episodes))
            lengths.append(to_host(rollout.response_length))
            truncated.append(to_host(rollout.truncated))
        results[f"{name}/{key}"] = float(np.mean(np.concatenate(correct)))
        results[f"{name}/response_length"] = float(np.mean(np.concatenate(lengths)))
        results[f"{name}/truncation_rate"] = float(np.mean(np.concatenate(truncated)))
        results.update({f"{name}/{k}": v for k, v in episode_metrics(episodes).items()})
    if benchmarks:
        results[key] = float(np.mean([results[f"{n}/{key}"] for n in benchmarks]))
    return results


class _Scoring:
    """How an evaluation scores a rollout: `score_rollout` (one turn), or its episodes' rewards."""

    def __init__(self, scorer, tokenizer, env, model):
        self.scorer, self.tokenizer, self.env, self.vocab = scorer, tokenizer, env, model.cfg.vocab_size
        # scores are gathered on the model's own devices (not a rollout group's, in a two-group run)
        self.devices = None if model.mesh is None else list(model.mesh.devices.flat)

    def turns(self, batch) -> EnvTurns | None:
        if self.env is None:
            return None
        return EnvTurns(self.env, batch, self.tokenizer, vocab_size=self.vocab)

    def score(self, rollout, batch, turns: EnvTurns | None, episodes: list) -> np.ndarray:
        if turns is None:
            return score_rollout(self.scorer, self.tokenizer, rollout, [e.answer for e in batch], devices=self.devices)
        turns.close()
        k = len(turns.episodes) // len(batch)
        ended = [turns.episodes[(j, n)] for j in range(len(batch)) for n in range(k)]
        episodes += ended
        return np.asarray([e.reward for e in ended], np.float32)


def load_options(data: DataSettings) -> LoadOptions:
    """The data-loading options of a run (its training prompts and its benchmarks alike)."""
    return LoadOptions(template=data.template, max_prompt_len=data.max_prompt_len, problem_key=data.problem_key,
                       answer_key=data.answer_key, strict=data.strict, enable_thinking=data.enable_thinking)


def load_benchmarks(tokenizer, data: DataSettings) -> dict[str, list[PromptExample]]:
    """Each of `data.eval_files`' fixed-seed subset of `data.eval_limit` problems (0 = all), named by
    the file stem."""
    out = {}
    for path in data.eval_files:
        examples, _ = load_eval_set(path, tokenizer, load_options(data), limit=data.eval_limit or None,
                                    seed=data.seed)
        out[Path(path).stem] = examples
    return out


class Evaluation:
    """`evaluate` with its benchmarks, settings and scorer bound: `evaluation(model) -> results`."""

    def __init__(self, tokenizer, benchmarks: dict[str, list[PromptExample]], settings: EvalSettings,
                 scorer: RewardScorer, progress: bool = False, env: Environment | None = None):
        self.tokenizer, self.benchmarks, self.settings = tokenizer, benchmarks, settings
        self.scorer, self.progress, self.env = scorer, progress, env

    def __call__(self, model) -> dict[str, float]:
        return evaluate(model, self.tokenizer, self.benchmarks, self.settings, self.scorer, progress=self.progress,
                        env=self.env)


def main(argv):
    from absl import flags
    from flax import nnx

    from reval_jax.data.templates import stop_token_ids
    from reval_jax.run import config as run_config
    from reval_jax.run.policy import load_checkpoint_policy, load_hf_policy, make_run_mesh

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    config = FLAGS.config
    if FLAGS.greedy:
        config.eval.temperature, config.eval.k = 0.0, 1
    mesh = make_run_mesh(config)
    if FLAGS.checkpoint:
        model, tokenizer = load_checkpoint_policy(FLAGS.checkpoint, config, mesh)
    else:
        model, tokenizer = load_hf_policy(run_config.model_settings(config), mesh, path=FLAGS.hf or None)
    layout = run_config.rollout_layout(config, mesh, model.cfg)
    graphdef, params = nnx.split(model)
    del model
    model = layout(graphdef, params)  # the sampler's layout and dtype; the master is not needed after
    del params
    benchmarks = load_benchmarks(tokenizer, run_config.data_settings(config))
    r = run_config.reward_settings(config)
    settings = run_config.eval_settings(config, stop_token_ids(tokenizer))
    e = run_config.env_settings(config)
    with (RewardScorer(r.name, template=r.template, num_workers=r.num_workers, timeout_s=r.timeout_s) as scorer,
          contextlib.ExitStack() as stack):
        env = stack.enter_context(get_environment(e.name, e.config, tokenizer, scorer)) if e.multi_turn else None
        results = evaluate(model, tokenizer, benchmarks, settings, scorer, progress=config.progress, env=env)
    text = json.dumps(results, indent=2)
    print(text)
    if FLAGS.out:
        Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.out).write_text(text + "\n")


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from reval_jax.run import cli

    config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("hf", "", "Hugging Face directory to evaluate (default: config.model.path).")
    flags.DEFINE_string("checkpoint", "", "Training checkpoint to evaluate: a workdir, its checkpoints/ "
                        "directory (the newest usable step) or one step directory.")
    flags.DEFINE_bool("greedy", False, "One greedy (argmax) answer per problem: --config.eval.temperature=0 "
                      "--config.eval.k=1 (temperature 0 alone keeps eval.k identical samples).")
    flags.DEFINE_string("out", "", "Write the results to this JSON file too.")
    flags.mark_flags_as_required(["config"])
    cli.run_absl(main)
