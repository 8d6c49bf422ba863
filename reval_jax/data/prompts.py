"""Prompt data: problems with verifiable answers, tokenised, shuffled and batched with ``grain``.

Input files are JSON Lines (``.jsonl``, or ``.json`` holding JSON Lines or one JSON array of
objects) or Parquet (``.parquet``), with a problem and an answer column whose names are
configurable (``problem``/``answer`` in ``/work/shared/data/math``, see its README). A numeric
answer (``"answer": 6``) is used as its string. Rows whose problem or answer is missing, empty or not
a string (or number), and JSON Lines lines that are not valid JSON, are skipped and counted (the
invalid lines by number, in ``DataStats.invalid_lines``; ``strict=True`` makes an invalid line an
error); prompts longer than ``max_prompt_len`` tokens (after the prompt template) are dropped and
counted. A missing file, an unsupported suffix and a ``.parquet`` file that is not Parquet are
errors that name the file (``UserError``: one line on the command line).

A call's loading options (template, length cap, columns, strictness) travel as one ``LoadOptions``.
Training prompts come from ``prompt_batches``: a ``grain`` pipeline that shuffles with a seed,
repeats over epochs (each epoch in a different order, all fixed by the seed) and yields lists of
``prompts_per_batch`` examples. On several hosts every process takes its contiguous slice of each
global batch. The iterator's ``get_state()`` / ``set_state()`` checkpoint its position exactly.

Evaluation sets come from ``load_eval_set``: the first ``limit`` problems after a shuffle with a
fixed seed (training-time evaluation caps each benchmark at 100 problems).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from reval_jax.data.templates import apply_template
from reval_jax.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


@dataclasses.dataclass(frozen=True)
class PromptExample:
    """One problem: its id, text, ground-truth answer and the token ids of the templated prompt."""

    id: str
    problem: str
    answer: str
    prompt_ids: list[int]


@dataclasses.dataclass(frozen=True)
class DataStats:
    """What loading kept and why the rest was left out (counts over all files)."""

    files: tuple[str, ...]
    rows_read: int  # rows in the files
    skipped_missing: int  # problem or answer missing, empty or not a string; or not valid JSON
    dropped_too_long: int  # templated prompt longer than max_prompt_len tokens
    kept: int  # examples returned
    skipped_by_limit: int = 0  # valid rows left out by an evaluation cap (load_eval_set)
    invalid_lines: tuple[str, ...] = ()  # "file:line" of JSON Lines lines that are not valid JSON


@dataclasses.dataclass(frozen=True)
class ProblemRow:
    """A valid row of a data file, before templating."""

    id: str
    problem: str
    answer: str


def _as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise UserError("no data files given")
    return paths


def _read_records(path: str, keys: Sequence[str], strict: bool = False,
                  invalid: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows of one file as dicts (only ``keys``, where present). A JSON Lines line that is not
    valid JSON is an empty row, its ``"file:line"`` appended to ``invalid`` (an error if ``strict``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if lower.endswith(".json") and text.lstrip().startswith("["):
            # A ".json" file may also hold one JSON array of rows.
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: not a valid JSON array ({e})") from e
        else:
            records = []
            for line_number, line in enumerate(text.split("\n"), start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    if strict:
                        raise UserError(f"{path}:{line_number}: not valid JSON ({e}); "
                                        "data.strict=False skips and counts such lines") from e
                    records.append({})
                    if invalid is not None:
                        invalid.append(f"{path}:{line_number}")
        return [record if isinstance(record, dict) else {} for record in records]
    if lower.endswith(PARQUET_SUFFIXES):
        return _read_parquet(path, keys)
    raise UserError(
        f"unsupported data file {path!r}: expected one of {JSONL_SUFFIXES + PARQUET_SUFFIXES}"
    )


def _read_parquet(path: str, keys: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of a Parquet file (only ``keys``, where present); a file that is not Parquet is a UserError."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        schema_names = set(pq.read_schema(path).names)
        table = pq.read_table(path, columns=[k for k in dict.fromkeys(keys) if k in schema_names])
        if table.num_columns == 0:
            return [{} for _ in range(pq.read_metadata(path).num_rows)]
    except pyarrow.ArrowException as e:
        reason = " ".join(str(e).split())
        raise UserError(f"{path}: not a readable Parquet file ({reason})") from e
    return table.to_pylist()


def _valid(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _as_answer(value: Any) -> Any:
    """A numeric answer (``6``, ``2.5``) as its string; anything else unchanged."""
    if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
        return str(value)
    return value


def read_rows(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    problem_key: str = "problem",
    answer_key: str = "answer",
    id_key: str = "id",
    strict: bool = False,
    invalid: list[str] | None = None,
) -> tuple[list[ProblemRow], int, int]:
    """Valid rows of the files in order, the number of rows read and of rows skipped.

    A row's id is its ``id_key`` value when that is a non-empty string, else ``"{file}:{row}"``.
    Invalid JSON lines are skipped (their ``"file:line"`` appended to ``invalid``) unless
    ``strict``. Raises if a file is missing or if no valid row is left.
    """
    paths = _as_paths(paths)
    rows: list[ProblemRow] = []
    rows_read = skipped = 0
    for path in paths:
        records = _read_records(path, (problem_key, answer_key, id_key), strict, invalid)
        rows_read += len(records)
        for i, record in enumerate(records):
            problem, answer = record.get(problem_key), _as_answer(record.get(answer_key))
            if not (_valid(problem) and _valid(answer)):
                skipped += 1
                continue
            row_id = record.get(id_key)
            row_id = row_id if _valid(row_id) else f"{os.path.basename(path)}:{i}"
            rows.append(ProblemRow(row_id, problem, answer.strip()))
    if not rows:
        raise UserError(
            f"no usable rows in {paths}: {rows_read} rows read, {skipped} without a non-empty "
            f"string in both {problem_key!r} and {answer_key!r}"
        )
    return rows, rows_read, skipped


def _tokenize(
    rows: Sequence[ProblemRow], tokenizer: Any, template: str, max_prompt_len: int | None,
    enable_thinking: bool | None = None,
) -> tuple[list[PromptExample], int]:
    """Templated, tokenised examples of ``rows`` and how many were dropped as too long
    (``enable_thinking``: see ``templates.apply_template``)."""
    texts = [apply_template(tokenizer, row.problem, template, enable_thinking=enable_thinking)
             for row in rows]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    examples = []
    for row, prompt_ids in zip(rows, ids, strict=True):
        if max_prompt_len is not None and len(prompt_ids) > max_prompt_len:
            continue
        examples.append(PromptExample(row.id, row.problem, row.answer, list(prompt_ids)))
    return examples, len(rows) - len(examples)


def load_examples(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any,
    template: str,
    max_prompt_len: int | None,
    problem_key: str = "problem",
    answer_key: str = "answer",
    strict: bool = False,
    enable_thinking: bool | None = None,
) -> tuple[list[PromptExample], DataStats]:
    """All usable examples of the files, in file order, with the loading counts.

    Raises if no example is left (every row invalid, or every prompt too long).
    """
    paths = _as_paths(paths)
    invalid: list[str] = []
    rows, rows_read, skipped = read_rows(paths, problem_key, answer_key, strict=strict, invalid=invalid)
    examples, too_long = _tokenize(rows, tokenizer, template, max_prompt_len, enable_thinking)
    if not examples:
        raise UserError(
            f"every prompt of {paths} is longer than max_prompt_len={max_prompt_len} tokens"
        )
    stats = DataStats(tuple(paths), rows_read, skipped, too_long, len(examples),
                      invalid_lines=tuple(invalid))
    return examples, stats


def _process_slice(batch: list[PromptExample], start: int, stop: int) -> list[PromptExample]:
    return batch[start:stop]


def batch_iterator(
    examples: Sequence[PromptExample],
    prompts_per_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator over batches (lists) of examples.

    The global batch holds ``prompts_per_batch`` examples; this process gets its contiguous slice
    ``[process_index * n, (process_index + 1) * n)`` with ``n = prompts_per_batch / process_count``.
    Examples are shuffled with ``seed`` and repeated ``num_epochs`` times (``None``: forever), each
    epoch in its own order; a batch may span two epochs, and a last incomplete batch is dropped.
    Everything runs in the calling thread, so ``get_state()`` is exactly the next batch.
    """
    if not examples:
        raise UserError("no examples to iterate over")
    if prompts_per_batch < 1 or prompts_per_batch % process_count:
        raise ValueError(
            f"prompts_per_batch={prompts_per_batch} must be a positive multiple of "
            f"process_count={process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    per_process = prompts_per_batch // process_count
    start = process_index * per_process
    ds = grain.MapDataset.source(list(examples)).shuffle(seed=seed).repeat(num_epochs)
    ds = ds.batch(prompts_per_batch, drop_remainder=True, batch_fn=list)
    ds = ds.map(functools.partial(_process_slice, start=start, stop=start + per_process))
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(ds.to_iter_dataset(options))


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How a call turns data files into prompts: the prompt `template` (``templates.apply_template``,
    with its ``enable_thinking`` switch), the prompt-length cap ``max_prompt_len`` (None: none), the
    problem and answer columns, and whether an invalid JSON Lines line is an error (``strict``)."""

    template: str
    max_prompt_len: int | None = None
    problem_key: str = "problem"
    answer_key: str = "answer"
    strict: bool = False
    enable_thinking: bool | None = None


def prompt_batches(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any,
    options: LoadOptions,
    prompts_per_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[grain.DatasetIterator, DataStats]:
    """Training prompts: ``load_examples`` then an endless ``batch_iterator`` over them."""
    o = options
    examples, stats = load_examples(
        paths, tokenizer, o.template, o.max_prompt_len, o.problem_key, o.answer_key, strict=o.strict,
        enable_thinking=o.enable_thinking,
    )
    iterator = batch_iterator(
        examples, prompts_per_batch, seed, process_index=process_index, process_count=process_count
    )
    return iterator, stats


def load_eval_set(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any,
    options: LoadOptions,
    limit: int | None = 100,
    seed: int = 0,
) -> tuple[list[PromptExample], DataStats]:
    """A benchmark: the first ``limit`` valid problems after a shuffle with ``seed`` (all of them,
    in file order, when ``limit`` is None).

    The subset depends only on the files and the seed, not on the tokenizer: it is chosen before
    tokenising, and prompts longer than ``options.max_prompt_len`` are then dropped and counted.
    """
    o = options
    paths = _as_paths(path)
    invalid: list[str] = []
    rows, rows_read, skipped = read_rows(paths, o.problem_key, o.answer_key, strict=o.strict, invalid=invalid)
    capped = 0
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit must be >= 1 or None, got {limit}")
        order = np.random.default_rng(seed).permutation(len(rows))
        capped = max(0, len(rows) - limit)
        rows = [rows[i] for i in order[:limit]]
    examples, too_long = _tokenize(rows, tokenizer, o.template, o.max_prompt_len, o.enable_thinking)
    if not examples:
        raise UserError(
            f"every prompt of {paths} is longer than max_prompt_len={o.max_prompt_len} tokens"
        )
    stats = DataStats(tuple(paths), rows_read, skipped, too_long, len(examples), capped, tuple(invalid))
    return examples, stats
