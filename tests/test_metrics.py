"""The metrics writer: JSONL names as given, TensorBoard tags made legal."""

import logging

from reval_jax.metrics import MetricsWriter, read_metrics, tensorboard_tag


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
