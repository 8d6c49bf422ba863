"""Plots of run metrics: several workdirs into PNG files."""

import json

import pytest

from reval_jax.tools.plot import main, plot


def _workdir(path, algorithm, acc):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"algorithm": algorithm}))
    rows = [{"kind": "train", "iteration": i, "accuracy": a, "reward_mean": 0.0, "response_length": 10 + i}
            for i, a in enumerate(acc, 1)]
    if algorithm != "grpo":  # GRPO has no reference policy and logs no kl_mean
        for i, row in enumerate(rows):
            row["kl_mean"] = 0.1 * i - 0.1
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


def test_panels_show_raw_reward_and_say_why_a_curve_is_missing(tmp_path, monkeypatch):
    """reward.png plots accuracy, not the centered reward (always 0); the KL panel is named for what
    it is and says that GRPO has no KL curve."""
    import matplotlib.axes

    from reval_jax.tools import plot as plot_module

    texts, series = [], []
    text, line = matplotlib.axes.Axes.text, matplotlib.axes.Axes.plot

    def record_text(ax, x, y, s, **kw):
        texts.append(s)
        return text(ax, x, y, s, **kw)

    def record_plot(ax, xs, ys, **kw):
        series.append(list(ys))
        return line(ax, xs, ys, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", record_text)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record_plot)
    a = _workdir(tmp_path / "reval", "reval", [0.2, 0.5, 0.9])
    b = _workdir(tmp_path / "grpo", "grpo", [0.2, 0.3, 0.4])
    written = plot([a, b], str(tmp_path / "out"))
    assert "kl.png" in [p.name for p in written]
    keys = [key for curves in plot_module.PANELS.values() for _, key, _ in curves]
    assert "reward_mean" not in keys and "accuracy" in keys
    kl_title = plot_module.PANELS["kl"][0][2]
    assert "Σ log π_θ/π_ref over the sampled response" in kl_title and "negative" in kl_title
    assert any("grpo (grpo): GRPO uses no reference policy: no KL curve" in t for t in texts)
    assert [0.2, 0.5, 0.9] in series  # the raw accuracy is drawn


def test_length_axis_starts_at_zero():
    """length.png once spanned 30.8-31.8 tokens: matplotlib zoomed into noise. Counts start at 0."""
    from reval_jax.tools.plot import y_limits

    assert y_limits("response_length", [30.8, 31.2, 31.8]) == (0.0, 1.05 * 31.8)
    assert y_limits("response_length", []) is None
    assert y_limits("accuracy", [0.2, 0.3]) is None  # rates keep matplotlib's range
