"""Plots of run metrics: several workdirs into PNG files."""

import json

import pytest

from reval_jax.plot import main, plot


def _workdir(path, algorithm, acc):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"algorithm": algorithm}))
    rows = [{"kind": "train", "iteration": i, "accuracy": a, "reward_mean": a - 0.5, "kl_mean": 0.1 * i,
             "response_length": 10 + i} for i, a in enumerate(acc, 1)]
    rows += [{"kind": "eval", "iteration": 0, "avg@4": 0.2, "x/avg@4": 0.2},
             {"kind": "eval", "iteration": 2, "avg@4": 0.5, "x/avg@4": 0.5}]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_plots_compare_runs(tmp_path):
    a = _workdir(tmp_path / "reval", "reval", [0.2, 0.5, 0.9])
    b = _workdir(tmp_path / "grpo", "grpo", [0.2, 0.3, 0.4])
    written = plot([a, b], str(tmp_path / "out"))
    assert sorted(p.name for p in written) == ["eval.png", "kl.png", "length.png", "reward.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_missing_metrics_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        main([str(tmp_path)])
