"""The one-prompt experiment script end to end on a reduced setting, and the embedded default
config (configs/tiny.py) on a shortened run."""

import json

from reval_jax import one_prompt, train


def test_one_prompt_experiment_reduced(tmp_path):
    results = one_prompt.main([
        f"--out={tmp_path}", "--levels=easy", "--updates=2", "--seeds=1", "--max_rounds=2",
        "--samples=4", "--eval_samples=8", "--max_new_tokens=44",
    ])
    assert [(r["algorithm"], r["updates"]) for r in results] == [("grpo", 1), ("reval", 2)]
    assert all(r["rounds"] is None or 0 <= r["rounds"] <= 2 for r in results)
    table = (tmp_path / "table.md").read_text()
    assert "grpo K=1" in table and "reval K=2" in table
    assert (tmp_path / "rounds_to_target.png").stat().st_size > 5000
    assert json.loads((tmp_path / "results.json").read_text()) == results


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
