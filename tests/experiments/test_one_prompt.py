"""The one-prompt experiment script end to end on a reduced setting, and the embedded default
config (configs/tiny.py) on a shortened run."""

import json

import pytest

from reval_jax.experiments import one_prompt, toy
from reval_jax.run import train
from reval_jax.run.metrics import read_metrics
from reval_jax.tools import plot


@pytest.mark.e2e  # generates, trains and evaluates: the experiment script end to end
def test_one_prompt_experiment_reduced(tmp_path):
    results = one_prompt.main([
        f"--out={tmp_path}", "--levels=easy", "--updates=2", "--seeds=1", "--max_rounds=2",
        "--samples=4", "--eval_samples=8", "--max_new_tokens=44", "--candidates=3", "--select_samples=8",
    ])
    assert [(r["algorithm"], r["updates"]) for r in results] == [("grpo", 1), ("reval", 2)]
    assert all(r["rounds"] is None or 0 <= r["rounds"] <= 2 for r in results)
    table = (tmp_path / "table.md").read_text()
    assert "| GRPO | reval K=2 |" in table
    assert (tmp_path / "rounds_to_target.png").stat().st_size > 5000
    assert json.loads((tmp_path / "results.json").read_text()) == results
    prompt = json.loads((tmp_path / "prompts.json").read_text())["easy"]
    assert prompt["problem"] in {p for p, _ in toy.make_problems("easy", 3)}
    assert prompt["base_success"] in {i / 8 for i in range(9)}  # measured over --select_samples
    rows = [json.loads(line) for line in (tmp_path / "easy.jsonl").read_text().splitlines()]
    assert [(r["problem"], r["answer"]) for r in rows] == [(prompt["problem"], prompt["answer"])]


def test_summary_marks_runs_that_missed_the_target():
    results = [{"level": "hard", "algorithm": "grpo", "updates": 1, "seed": s, "rounds": None} for s in (0, 1)]
    results += [{"level": "hard", "algorithm": "reval", "updates": 8, "seed": s, "rounds": r}
                for s, r in ((0, 10), (1, 20))]
    table = one_prompt.summarize(results, ["hard"], [("grpo", 1), ("reval", 8)], cap=100,
                                 prompts={"hard": {"base_success": 0.1}})
    assert "| hard (0.10) | > 100 (2 missed) | 15, ≥ 6.7× | 3.6× |" in table
    assert "average" not in table  # a bound is not averaged
    results[:2] = [dict(r, rounds=30) for r in results[:2]]
    table = one_prompt.summarize(results, ["hard"], [("grpo", 1), ("reval", 8)], cap=100)
    assert "| hard | 30 | 15, 2.0× | 3.6× |" in table and "average speed-up over GRPO 2.00×" in table


@pytest.mark.e2e  # train.run and plot: the demo, shortened
def test_tiny_config_runs_shortened(tmp_path):
    from configs import tiny

    config = tiny.get_config()
    config.num_iterations = 2
    config.data.prompts_per_iteration = 4
    config.eval.every = 2
    config.eval.limit = 8
    config.eval.k = 2
    last = train.run(config, str(tmp_path))
    assert last["iteration"] == 2 and 0.0 <= last["accuracy"] <= 1.0
    assert (tmp_path / "checkpoints" / "2").exists()
    evals = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert [r["iteration"] for r in evals] == [0, 2]
    written = plot.plot([str(tmp_path)])  # the second half of `make demo`
    assert {p.name for p in written} >= {"eval.png", "reward.png"}
    assert all(p.stat().st_size > 5000 for p in written)
