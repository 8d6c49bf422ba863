"""Prompt data: reading and filtering rows, tokenising, and the checkpointable grain pipeline."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import math_data_file, tiny_tokenizer

from reval_jax.data.prompts import (
    LoadOptions,
    PromptExample,
    batch_iterator,
    load_eval_set,
    load_examples,
    prompt_batches,
)
from reval_jax.data.templates import apply_template, encode_prompt
from reval_jax.errors import UserError

GSM8K_TEST = math_data_file("gsm8k_test.jsonl")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def make_examples(n):
    return [PromptExample(f"p{i}", f"problem {i}", str(i), [i]) for i in range(n)]


def ids(batch):
    return [example.id for example in batch]


def take(iterator, n):
    return [ids(next(iterator)) for _ in range(n)]


def test_real_gsm8k_rows():
    tokenizer = tiny_tokenizer()
    examples, stats = load_eval_set(GSM8K_TEST, tokenizer, LoadOptions("r1_distill"), limit=50, seed=0)
    assert (stats.rows_read, stats.skipped_missing, stats.dropped_too_long) == (1319, 0, 0)
    assert (stats.kept, stats.skipped_by_limit) == (50, 1319 - 50)
    assert len({e.id for e in examples}) == 50
    with open(GSM8K_TEST) as f:
        rows = {row["id"]: row for row in map(json.loads, f)}
    for example in examples:
        row = rows[example.id]
        assert (example.problem, example.answer) == (row["problem"], row["answer"])
        assert example.prompt_ids == encode_prompt(tokenizer, row["problem"], "r1_distill")
        assert tokenizer.decode(example.prompt_ids) == apply_template(
            tokenizer, row["problem"], "r1_distill"
        )
    # A fixed seed fixes the subset; another seed gives another one; None keeps the file order.
    again, _ = load_eval_set(GSM8K_TEST, tokenizer, LoadOptions("r1_distill"), limit=50, seed=0)
    assert ids(again) == ids(examples)
    other, _ = load_eval_set(GSM8K_TEST, tokenizer, LoadOptions("r1_distill"), limit=50, seed=1)
    assert ids(other) != ids(examples)
    everything, stats = load_eval_set(GSM8K_TEST, tokenizer, LoadOptions("plain"), limit=None)
    assert ids(everything) == list(rows) and stats.skipped_by_limit == 0


def test_real_files_train_pipeline():
    files = [math_data_file("aime24.jsonl"), math_data_file("amc23.jsonl")]
    iterator, stats = prompt_batches(
        files, tiny_tokenizer(), LoadOptions("qwen_math", max_prompt_len=2048), prompts_per_batch=16, seed=3
    )
    assert stats.files == tuple(files) and stats.rows_read == 70 and stats.kept == 70
    first_epoch = [i for _ in range(5) for i in ids(next(iterator))][:70]
    assert len(set(first_epoch)) == 70


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"id": "good-1", "problem": "1+1?", "answer": "2"},
            {"id": "no-answer", "problem": "2+2?"},
            {"id": "empty-problem", "problem": "", "answer": "1"},
            {"id": "blank-answer", "problem": "3+3?", "answer": "  "},
            {"id": "int-answer", "problem": "4+4?", "answer": 8},
            {"id": "null-problem", "problem": None, "answer": "1"},
            "[1, 2]",
            "",
            {"problem": "5+5?", "answer": " 10 "},
        ],
    )
    examples, stats = load_examples(path, tiny_tokenizer(), "plain", max_prompt_len=None)
    # a row without an id gets file:row; a numeric answer is used as its string
    assert ids(examples) == ["good-1", "int-answer", "mixed.jsonl:7"]
    assert examples[1].answer == "8" and examples[2].answer == "10"
    assert (stats.rows_read, stats.skipped_missing, stats.dropped_too_long, stats.kept) == (
        8,
        5,
        0,
        3,
    )


def test_numeric_answers_are_strings(tmp_path):
    path = write_jsonl(tmp_path / "nums.jsonl", [{"problem": "2*3?", "answer": 6},
                                                  {"problem": "5/2?", "answer": 2.5},
                                                  {"problem": "yes?", "answer": True}])
    examples, stats = load_examples(path, tiny_tokenizer(), "plain", None)
    assert [e.answer for e in examples] == ["6", "2.5"] and stats.skipped_missing == 1


def test_invalid_json_line_is_skipped_and_counted_unless_strict(tmp_path):
    path = write_jsonl(tmp_path / "some_broken.jsonl",
                       [{"problem": "a", "answer": "b"}, "{oops", {"problem": "c", "answer": 3}])
    examples, stats = load_examples(path, tiny_tokenizer(), "plain", None)
    assert [e.problem for e in examples] == ["a", "c"]
    assert (stats.rows_read, stats.skipped_missing, stats.kept) == (3, 1, 2)
    assert stats.invalid_lines == (f"{path}:2",)
    _, eval_stats = load_eval_set(path, tiny_tokenizer(), LoadOptions("plain"), limit=None)
    assert eval_stats.invalid_lines == (f"{path}:2",)
    with pytest.raises(ValueError, match="some_broken.jsonl:2: not valid JSON"):
        load_examples(path, tiny_tokenizer(), "plain", None, strict=True)


def test_custom_keys_and_parquet(tmp_path):
    path = str(tmp_path / "train.parquet")
    table = pa.table(
        {
            "question": ["What is 2+3?", None, "What is 7*6?"],
            "solution": ["5", "1", "42"],
            "other": [1, 2, 3],
        }
    )
    pq.write_table(table, path)
    jsonl = write_jsonl(tmp_path / "more.jsonl", [{"question": "9-1?", "solution": "8"}])
    examples, stats = load_examples(
        [path, jsonl], tiny_tokenizer(), "plain", None, "question", "solution"
    )
    assert [(e.problem, e.answer) for e in examples] == [
        ("What is 2+3?", "5"),
        ("What is 7*6?", "42"),
        ("9-1?", "8"),
    ]
    assert (stats.rows_read, stats.skipped_missing, stats.kept) == (4, 1, 3)
    # The default keys are absent from this file: every row is skipped, which is an error.
    with pytest.raises(ValueError, match="no usable rows.*train.parquet.*'problem'.*'answer'"):
        load_examples(path, tiny_tokenizer(), "plain", None)


def test_json_array_file_and_unicode_line_separators(tmp_path):
    path = tmp_path / "rows.json"
    rows = [{"problem": "a\u2028b?", "answer": "1"}, {"problem": "c?", "answer": "2"}]
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    examples, stats = load_examples(str(path), tiny_tokenizer(), "plain", None)
    assert [e.problem for e in examples] == ["a\u2028b?", "c?"] and stats.kept == 2
    lines = write_jsonl(tmp_path / "rows.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows])
    examples, stats = load_examples(lines, tiny_tokenizer(), "plain", None)
    assert [e.problem for e in examples] == ["a\u2028b?", "c?"] and stats.rows_read == 2


def test_all_bad_file_error_names_file_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1+1?", "answer": "2"}] * 3)
    with pytest.raises(ValueError) as info:
        load_examples(path, tiny_tokenizer(), "plain", None)
    message = str(info.value)
    assert path in message and "'problem'" in message and "'answer'" in message
    assert "3 rows read" in message


def test_missing_unsupported_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(str(tmp_path / "nope.jsonl"), tiny_tokenizer(), "plain", None)
    csv = tmp_path / "data.csv"
    csv.write_text("problem,answer\n1+1,2\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_examples(str(csv), tiny_tokenizer(), "plain", None)
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"problem": "a", "answer": "b"}, "{oops"])
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_examples(broken, tiny_tokenizer(), "plain", None, strict=True)
    not_parquet = tmp_path / "rows.parquet"
    not_parquet.write_text('{"problem": "1+1", "answer": "2"}\n')
    with pytest.raises(UserError, match=r"rows.parquet: not a readable Parquet file \(.*magic bytes") as info:
        load_examples(str(not_parquet), tiny_tokenizer(), "plain", None)
    assert "\n" not in str(info.value)


def test_too_long_prompts_are_dropped_and_counted(tmp_path):
    tokenizer = tiny_tokenizer()
    problems = ["x" * n for n in (5, 40, 10, 80, 20)]
    path = write_jsonl(
        tmp_path / "lengths.jsonl", [{"problem": p, "answer": "1"} for p in problems]
    )
    limit = len(encode_prompt(tokenizer, "x" * 20, "r1_distill"))  # exactly fits
    examples, stats = load_examples(path, tokenizer, "r1_distill", max_prompt_len=limit)
    assert [len(e.problem) for e in examples] == [5, 10, 20]
    assert max(len(e.prompt_ids) for e in examples) == limit
    assert (stats.rows_read, stats.dropped_too_long, stats.kept) == (5, 2, 3)
    with pytest.raises(ValueError, match="longer than max_prompt_len=3"):
        load_examples(path, tokenizer, "r1_distill", max_prompt_len=3)
    _, eval_stats = load_eval_set(path, tokenizer, LoadOptions("r1_distill", max_prompt_len=limit), limit=None)
    assert (eval_stats.dropped_too_long, eval_stats.kept) == (2, 3)


def test_shuffle_is_seeded_and_differs_per_epoch():
    examples = make_examples(10)
    first = take(batch_iterator(examples, 5, seed=7), 6)
    assert take(batch_iterator(examples, 5, seed=7), 6) == first
    assert take(batch_iterator(examples, 5, seed=8), 6) != first
    epochs = [first[0] + first[1], first[2] + first[3], first[4] + first[5]]
    for epoch in epochs:
        assert sorted(epoch) == sorted(ids(examples))  # each epoch sees every example once
    assert epochs[0] != ids(examples)  # shuffled
    assert len({tuple(epoch) for epoch in epochs}) == 3  # a new order every epoch


def test_batches_span_epochs_and_finite_epochs_end():
    examples = make_examples(10)
    batches = take(batch_iterator(examples, 4, seed=0), 5)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat[:10]) == sorted(flat[10:20]) == sorted(ids(examples))
    finite = list(batch_iterator(examples, 4, seed=0, num_epochs=2))
    assert [ids(b) for b in finite] == batches  # 20 examples -> 5 full batches, then the end


def test_state_restore_continues_identically():
    examples = make_examples(13)
    iterator = batch_iterator(examples, 4, seed=1)
    take(iterator, 3)
    state = iterator.get_state()
    state = json.loads(json.dumps(state))  # checkpoints store it as JSON
    expected = take(iterator, 8)  # crosses epoch boundaries
    resumed = batch_iterator(examples, 4, seed=1)
    take(resumed, 1)  # wherever it was, set_state moves it
    resumed.set_state(state)
    assert take(resumed, 8) == expected
    fresh = batch_iterator(examples, 4, seed=1)
    assert take(fresh, 3) != expected[:3]


def test_process_shards_are_disjoint_and_cover_the_global_batch():
    examples = make_examples(50)
    global_batches = take(batch_iterator(examples, 8, seed=5), 10)
    shards = [
        take(batch_iterator(examples, 8, seed=5, process_index=p, process_count=4), 10)
        for p in range(4)
    ]
    for step, global_batch in enumerate(global_batches):
        parts = [shard[step] for shard in shards]
        assert all(len(part) == 2 for part in parts)
        assert [i for part in parts for i in part] == global_batch
        assert len(set(global_batch)) == 8  # 8 <= 50: one batch never holds an example twice
    with pytest.raises(ValueError, match="multiple of process_count"):
        batch_iterator(examples, 6, seed=5, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        batch_iterator(examples, 8, seed=5, process_index=4, process_count=4)
