"""The run record: metrics.jsonl survives a kill mid-write, TensorBoard events of iterations a resume
dropped are not duplicated, JSONL names stay as given and TensorBoard tags are made legal."""

import io
import json
import logging

import pytest
from helpers import tb_scalars

from reval_jax.run.metrics import MetricsWriter, read_metrics, tensorboard_tag, truncate_after
from reval_jax.tools.plot import plot


def _write_run(workdir, iterations):
    writer = MetricsWriter(workdir, stream=io.StringIO())
    for i in iterations:
        writer.write("train", i, {"loss": float(i), "accuracy": 0.1 * i})
    writer.close()


def test_a_resume_rewrites_the_events_without_duplicates(tmp_path):
    _write_run(tmp_path, range(1, 6))  # a run that reached 5, whose checkpoint 3 is resumed from
    writer = MetricsWriter(tmp_path, stream=io.StringIO())
    assert writer.rewind(3) == 2
    for i in (4, 5, 6):
        writer.write("train", i, {"loss": 10.0 * i, "accuracy": 0.1 * i})
    writer.close()
    loss = sorted((step, value) for tag, step, value in tb_scalars(tmp_path) if tag == "train/loss")
    assert loss == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def _partial(workdir):
    rows = [{"kind": "train", "iteration": i, "accuracy": 0.1 * i, "response_length": 10 + i} for i in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (workdir / "metrics.jsonl").write_text(text + '{"kind": "train", "iteration": 4, "accur')  # killed mid-write


def test_a_partial_last_line_is_dropped_with_a_warning(tmp_path):
    _partial(tmp_path)
    said = io.StringIO()
    assert [r["iteration"] for r in read_metrics(tmp_path, stream=said)] == [1, 2, 3]
    assert "metrics.jsonl:4: dropping a partial last record" in said.getvalue()
    assert truncate_after(tmp_path, 2, stream=io.StringIO()) == 1  # resume from 2: record 3 dropped
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2]


def test_plot_reads_a_run_killed_mid_write(tmp_path, capsys):
    _partial(tmp_path)
    assert {p.name for p in plot([str(tmp_path)])} == {"reward.png", "length.png"}
    assert "dropping a partial last record" in capsys.readouterr().err


def test_a_bad_line_in_the_middle_is_named(tmp_path):
    lines = ['{"kind": "train", "iteration": 1}', "not json", '{"kind": "train", "iteration": 2}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(tmp_path)


def test_tensorboard_tags_are_legal_and_jsonl_names_unchanged(tmp_path, caplog):
    assert tensorboard_tag("eval/avg@4") == "eval/avg_at_4"
    assert tensorboard_tag("eval/math 500/avg@16") == "eval/math_500/avg_at_16"
    writer = MetricsWriter(tmp_path)
    tags = []
    add_scalar = writer.tb.add_scalar
    writer.tb.add_scalar = lambda tag, *a, **k: (tags.append(tag), add_scalar(tag, *a, **k))
    with caplog.at_level(logging.WARNING):
        writer.write("eval", 3, {"avg@4": 0.5, "gsm8k/avg@4": 0.25})
    writer.close()
    assert tags == ["eval/avg_at_4", "eval/gsm8k/avg_at_4"]
    assert "illegal" not in caplog.text
    assert read_metrics(tmp_path) == [{"kind": "eval", "iteration": 3, "avg@4": 0.5, "gsm8k/avg@4": 0.25}]
