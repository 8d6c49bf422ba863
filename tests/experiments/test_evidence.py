"""The evidence script (reval_jax/experiments/evidence.py): its aggregation, intervals, tables,
plots and resuming on synthetic run records, the replay probe on a real buffer, and one tiny
real run end to end."""

import json
import re
import types
from pathlib import Path

import numpy as np
import pytest

from reval_jax.data.batch import Trajectories
from reval_jax.data.replay import ReplayBuffer
from reval_jax.experiments import evidence as ev


def _run(part, name, seed, rounds, curve, *, setting=None, max_rounds=60, probe=(), seconds=10.0):
    setting = setting or dataclass_dict(ev.Setting(part))
    return {"part": part, "name": name, "setting": setting, "seed": seed, "config": {}, "max_rounds": max_rounds,
            "target": 0.95, "curve": curve, "rounds_to_target": rounds, "rounds_run": rounds or max_rounds,
            "seconds": seconds, "seconds_per_round": seconds / (rounds or max_rounds), "train_s_per_round": 0.5,
            "probe": list(probe)}


def dataclass_dict(setting):
    import dataclasses

    return dataclasses.asdict(setting)


def _write(out: Path, runs):
    for r in runs:
        path = ev.record_path(out, r["part"], r["name"], r["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))


def test_settings_cover_the_issue_grid():
    per = ev.per_settings()
    assert len(per) == 24 and len({s.name for s in per}) == 24
    assert {(s.updates, s.buffer_rounds) for s in per} == {(k, c) for k in (2, 4, 8) for c in (4, 16)}
    assert sorted({s.alpha for s in per if s.prioritized}) == [0.6, 1.0] and sum(not s.prioritized for s in per) == 6
    fresh = [s for s in per if s.fresh == "delta"]
    assert len(fresh) == 6 and all(s.prioritized and s.alpha == 1.0 and s.name.endswith("_per1_fresh") for s in fresh)
    reuse = ev.reuse_settings()
    assert len({s.name for s in reuse}) == len(reuse) == 18  # K=8: R=K and R=8 are one setting
    assert {(s.updates, s.reset_every) for s in reuse if s.updates == 16} == {(16, 16), (16, 8)}
    table = ev.table_settings("table", {"reval": (1e-4, 3e-4), "grpo": (1e-3,)})
    assert [s.name for s in table] == ["reval_lr0.0001", "reval_lr0.0003", "grpo_lr0.001"]


def test_bootstrap_intervals():
    lo, hi = ev.mean_ci([10, 12, 14, 16, 18], boot=2000)
    assert 10 <= lo < 14 < hi <= 18
    wide = ev.mean_ci([0, 30, 5, 40, 1], boot=2000)
    assert wide[1] - wide[0] > hi - lo
    assert np.isnan(ev.mean_ci([3], boot=2000)[0])
    assert ev.mean_ci([7, 7, 7], boot=2000) == (7.0, 7.0)
    d, dlo, dhi = ev.diff_ci([10, 11, 12, 10, 11], [20, 21, 22, 20, 21], boot=2000)
    assert d == -10.0 and dlo <= -10 <= dhi < 0
    d, dlo, dhi = ev.diff_ci([10, 30, 12, 28], [20, 22, 18, 21], boot=2000)
    assert dlo < 0 < dhi  # overlapping samples: the interval holds zero


def test_t_intervals():
    lo, hi = ev.mean_ci([10, 12, 14, 16, 18])  # mean 14, sd √10, t(0.975, 4) = 2.776
    assert (lo, hi) == pytest.approx((14 - 2.7764 * np.sqrt(10 / 5), 14 + 2.7764 * np.sqrt(10 / 5)), abs=1e-3)
    assert ev.mean_ci([7, 7, 7]) == (7.0, 7.0) and np.isnan(ev.mean_ci([3])[1])
    boot = ev.mean_ci([10, 12, 14, 16, 18], boot=2000)
    assert boot[1] - boot[0] < hi - lo  # the bootstrap is narrower with five seeds
    d, dlo, dhi = ev.diff_ci([1, 2, 3], [1, 2, 3, 4, 5])  # Welch: se² = 1/3 + 2.5/5, df = 5.95
    se = np.sqrt(1 / 3 + 0.5)
    df = (1 / 3 + 0.5) ** 2 / ((1 / 3) ** 2 / 2 + 0.5**2 / 4)
    from scipy import stats

    half = stats.t.ppf(0.975, df) * se
    assert d == -1.0 and (dlo, dhi) == pytest.approx((-1 - half, -1 + half))
    assert ev.diff_ci([2, 2], [1, 1]) == (1.0, 1.0, 1.0)


def test_censoring_and_carried_accuracy():
    reached = _run("per", "x", 0, 12, [[0, 0.1], [5, 0.5], [12, 0.97]])
    missed = _run("per", "x", 1, None, [[0, 0.1], [60, 0.6]], max_rounds=60)
    assert ev.censored_rounds(reached) == 12 and ev.censored_rounds(missed) == 61
    assert ev.accuracy_at(reached, 4) == 0.1 and ev.accuracy_at(reached, 5) == 0.5
    assert ev.accuracy_at(reached, 30) == 0.97  # stopped at the target: carried forward
    cell = ev.summarize_cell([reached, missed], fixed_round=10, boot=200)
    assert cell["rounds"] == [12, 61] and cell["missed"] == 1 and cell["rounds_mean"] == 36.5
    assert cell["acc_at"] == [0.5, 0.1] and cell["last"] == [0.97, 0.6]


def _per_runs():
    runs = []
    for seed in range(3):
        for k in (2, 4, 8):
            for cap in (4, 16):
                for replay, rounds in (("uniform", 20 + seed), ("per0.6", 30 + seed), ("per1", None)):
                    s = ev.Setting("per", updates=k, buffer_rounds=cap, prioritized=replay != "uniform",
                                   alpha=1.0 if replay == "per1" else 0.6)
                    assert s.name == f"K{k}_cap{cap}_{replay}"
                    probe = [] if replay == "uniform" else [
                        {"iteration": 1, "top10_mass": 0.5, "unsampled_share": 0.25, "unsampled_mass": 0.6,
                         "priority_age": 1.0, "age_weighted": 0.5, "age_uniform": 1.5, "sampled_p_median": 0.5,
                         "p_max": 5.0}]
                    curve = [[0, 0.1], [10, 0.4 + 0.1 * (replay == "uniform")]]
                    curve += [[rounds, 0.96]] if rounds else [[60, 0.5]]
                    runs.append(_run("per", s.name, seed, rounds, curve, setting=dataclass_dict(s), probe=probe))
    return runs


def test_per_tables_from_synthetic_runs():
    summary = ev.summarize(_per_runs(), fixed_round=10, boot=500)["per"]
    text = ev.per_tables(summary, fixed_round=10, boot=500)
    row = next(line for line in text.splitlines() if line.startswith("| K=4, 16 rounds | 21.0"))
    assert "med 21 (n=3)" in row and "med 31 (n=3)" in row and "61.0 [61.0, 61.0], med 61 (n=3, 3 missed)" in row
    assert "| K=2, 4 rounds | 0.500 [0.500, 0.500] | 0.400 [0.400, 0.400] |" in text
    diff = re.search(r"\| K=8, 4 rounds \| α=0.6 \| \+10.0 \[\+([\d.]+), \+([\d.]+)\] \| -0.100 \[-0.100, -0.100\] \|",
                     text)
    assert diff and 8 < float(diff[1]) < 10 < float(diff[2]) < 12  # seeds 30..32 against 20..22
    assert "| K=8, 4 rounds | α=1.0 | +40.0 [" in text  # missed: counted as 61
    pooled = re.search(r"\| K ≥ 4, pooled \| α=0.6 \| \+10.0 \[\+([\d.]+), \+([\d.]+)\] \|", text)
    assert pooled and float(diff[1]) < float(pooled[1]) < 10 < float(pooled[2]) < float(diff[2])  # 12 runs an arm
    assert "| all, pooled | α=1.0 | +40.0 [" in text
    del summary["K2_cap4_per1"]
    assert "all, pooled | α=1.0" not in ev.per_tables(summary, fixed_round=10, boot=500)
    assert "| K=2, 16 rounds | α=1.0 | 0.50 | 0.25, 0.60 | 1.00 | 0.50 / 1.50 | 10.0 |" in text


def test_report_writes_tables_plots_and_results(tmp_path):
    runs = _per_runs()
    for seed in range(2):
        for k in (1, 2, 4, 8, 16):
            s = ev.Setting("reuse", updates=k, reset_every=k, buffer_rounds=4)
            runs.append(_run("reuse", s.name, seed, 40 // k + seed, [[0, 0.1], [40 // k + seed, 0.96]],
                             setting=dataclass_dict(s)))
    for a, lrs in (("reval", (1e-4, 1e-3)), ("grpo", (1e-4, 1e-3))):
        for lr in lrs:
            s = ev.Setting("table_sweep", algorithm=a, learning_rate=lr)
            runs.append(_run("table_sweep", s.name, 1000, None, [[0, 0.3], [20, 0.5 if lr == 1e-3 else 0.4]],
                             setting=dataclass_dict(s), max_rounds=20))
        for seed in range(3):
            s = ev.Setting("table", algorithm=a, learning_rate=1e-3)
            runs.append(_run("table", s.name, seed, None, [[0, 0.3], [20, 0.6 + 0.01 * seed]],
                             setting=dataclass_dict(s), max_rounds=20))
    for seed in range(2):
        for s in ev.per_settings("per_tiny")[:2]:  # K=2, 4 rounds: uniform and α 0.6
            runs.append(_run("per_tiny", s.name, seed, None, [[0, 0.3], [5, 0.5], [20, 0.7 + 0.1 * seed]],
                             setting=dataclass_dict(s), max_rounds=20))
    _write(tmp_path, runs)
    args = ev._parser().parse_args([f"--out={tmp_path}", "--table_lrs=1e-4,1e-3", "--boot=300"])
    summary = ev.report(tmp_path, args)
    assert set(summary) == {"per", "reuse", "table_sweep", "table", "per_tiny"}
    text = (tmp_path / "table.md").read_text()
    assert "| 2 | 20.5 [20.0, 21.0], med 20.5 (n=2) | not run |" in text
    assert "| 2 | 10 (0.5 per round) | not run | not run | not run |" in text  # seconds 10 over 20 and 21 rounds
    assert "| reval | 0.001 (0.0001 → 0.400, 0.001 → 0.500) | 0.610 [0.600, 0.620], n=3 | 0.50 | 0.50 |" in text
    assert "| tbrm | — (not run) | not run | — | — |" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["chosen_rates"] == {"reval": 1e-3, "grpo": 1e-3}
    assert results["summary"]["per"]["K2_cap4_uniform"]["rounds"] == [20, 21, 22]
    assert "| K=2, 4 rounds | 0.750" in text and "| K=8, 16 rounds | not run |" in text
    # per_tiny's rounds to --tiny_target (0.6) from the curve: seed 0 first ≥ 0.6 at round 20, seed 1 too;
    # K=2, 4 rounds' α 0.6 arm is the second setting: both arms reach it at 20 (a multiple of the cadence, 5)
    assert "rounds to held-out avg@4 ≥ 0.6 (evaluated every 5 rounds, so multiples of it; a miss counts as 21)" in text
    assert "| K=2, 4 rounds | 20.0 [20.0, 20.0], med 20 (n=2) | 20.0 [20.0, 20.0], med 20 (n=2) | not run |" in text
    assert results["summary"]["per_tiny"]["K2_cap4_uniform"]["acc_at"] == [0.5, 0.5]  # after 10: round 5's
    for png in ("per_curves.png", "per_rounds.png", "reuse_rounds.png", "table.png", "per_tiny_curves.png",
                "per_tiny_rounds.png"):
        assert (tmp_path / png).stat().st_size > 5000, png


def test_planned_skips_recorded_runs_seed_by_seed(tmp_path):
    args = ev._parser().parse_args([f"--out={tmp_path}", "--seeds=2", "--table_lrs=1e-4,1e-3"])
    first = ev.per_settings()[0]
    _write(tmp_path, [_run("per", first.name, 0, 10, [[0, 0.1], [10, 0.96]])])
    left = ev.planned("per", args, tmp_path)
    assert len(left) == 47 and (first, 0) not in left and (first, 1) in left
    assert [seed for _, seed in left] == [0] * 23 + [1] * 24
    assert ev.planned("table", args, tmp_path) == []  # no sweep yet: no rate chosen
    assert len(ev.planned("table_sweep", args, tmp_path)) == 12
    # a sweep done for some algorithms only: no table run yet (two --shard processes, one of them still
    # sweeping, would otherwise split different lists and run the same table run side by side)
    sweep = [(s, seed) for s, seed in ev.planned("table_sweep", args, tmp_path)]
    _write(tmp_path, [_run("table_sweep", s.name, seed, None, [[0, 0.3], [20, 0.5]], setting=dataclass_dict(s),
                           max_rounds=20) for s, seed in sweep[:-1]])
    assert ev.planned("table", args, tmp_path) == []
    s, seed = sweep[-1]
    _write(tmp_path, [_run("table_sweep", s.name, seed, None, [[0, 0.3], [20, 0.5]], setting=dataclass_dict(s),
                           max_rounds=20)])
    assert len(ev.planned("table", args, tmp_path)) == 12  # 6 algorithms × 2 seeds


def test_shards_split_the_runs_whatever_is_done(tmp_path):
    first = ev.per_settings()[0]
    _write(tmp_path, [_run("per", first.name, 0, 10, [[0, 0.1], [10, 0.96]])])  # run 0: shard 0's

    def left(shard):
        args = ev._parser().parse_args([f"--out={tmp_path}", "--seeds=2", f"--shard={shard}"])
        return [(s.name, seed) for s, seed in ev.planned("per", args, tmp_path)]

    halves = [left(f"{i}/2") for i in (0, 1)]
    assert [len(h) for h in halves] == [23, 24] and not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == sorted(left("0/1"))
    assert halves[1][:2] == [(ev.per_settings()[1].name, 0), (ev.per_settings()[3].name, 0)]
    for bad in ("2/2", "1", "a/b"):
        with pytest.raises(SystemExit, match=f"--shard={bad}: expected I/N"):
            ev.main([f"--out={tmp_path}", f"--shard={bad}", "--dry_run"])


def test_a_run_stopped_before_its_last_round_is_not_recorded(tmp_path, monkeypatch):
    from reval_jax.run import train

    def stopped(config, workdir, hooks=()):  # what a SIGTERM leaves: the rounds before it, below the target
        rows = [{"kind": "eval", "iteration": 0, "avg@4": 0.3}] + [
            {"kind": "train", "iteration": i, "generate_s": 1.0, "update_s": 1.0} for i in (1, 2, 3)]
        Path(workdir).mkdir(parents=True)
        (Path(workdir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    monkeypatch.setattr(train, "run", stopped)
    setting = ev.per_settings("per_tiny")[0]
    config = ev.table_config(setting, 0, ev._parser().parse_args([f"--out={tmp_path}"]))
    path = tmp_path / "runs" / "record.json"
    with pytest.raises(SystemExit, match="stopped after round 3 of 20 .*not recorded"):
        ev.execute(setting, 0, config, path, tmp_path / "scratch", 0.0, "avg@4")
    assert not path.exists()
    # a one-prompt run stops at its target: recorded
    ev.execute(setting, 0, config, path, tmp_path / "scratch", 0.25, "avg@4")
    assert json.loads(path.read_text())["rounds_to_target"] == 0


def test_choose_rates_needs_the_whole_sweep():
    cells = {ev.Setting("table_sweep", algorithm="rloo", learning_rate=lr).name: {"last_mean": m}
             for lr, m in ((1e-4, 0.3), (3e-4, 0.7), (1e-3, 0.5))}
    assert ev.choose_rates(cells, (1e-4, 3e-4, 1e-3)) == {"rloo": 3e-4}
    del cells["rloo_lr0.001"]
    assert ev.choose_rates(cells, (1e-4, 3e-4, 1e-3)) == {}


def _trajectories(n, iteration):
    from reval_jax.data.batch import FIELD_DTYPES, TOKEN_FIELDS

    arrays = {name: np.zeros((n, 4) if name in TOKEN_FIELDS else (n,), dtype) for name, dtype in FIELD_DTYPES.items()}
    return Trajectories.from_numpy({**arrays, "iteration": np.full(n, iteration, np.int32)})


def test_priority_probe_on_a_real_buffer():
    buffer = ReplayBuffer(8, 4, prioritized=True, alpha=1.0, seed=0)
    probe = ev.PriorityProbe()
    trainer = types.SimpleNamespace(buffer=buffer)
    buffer.add(_trajectories(4, 1))
    sample = buffer.sample(4)
    buffer.update_priorities(sample.indices, np.array([9.0, 1.0, 1.0, 1.0])[sample.indices])
    probe.on_round_end(trainer, 1, {})
    buffer.add(_trajectories(4, 2))  # new entries: the largest priority seen (9), never sampled
    probe.on_round_end(trainer, 2, {})
    first, second = probe.rows
    assert first["top10_mass"] == pytest.approx(9 / 12) and first["unsampled_mass"] == 0.0
    assert second["unsampled_share"] == 0.5 and second["unsampled_mass"] == pytest.approx(36 / 48)
    assert second["priority_age"] == pytest.approx(12 / 48)  # the first round's entries, set a round ago
    assert second["age_uniform"] == 0.5 and second["age_weighted"] == pytest.approx(12 / 48)
    assert second["p_max"] / second["sampled_p_median"] == pytest.approx(9.0)


@pytest.mark.e2e  # generates, trains and evaluates: one real run of part `per`, its record and probe
def test_one_real_prioritized_run(tmp_path):
    from reval_jax.experiments import toy

    args = ev._parser().parse_args([f"--out={tmp_path}", "--max_rounds=2", "--eval_samples=8", "--samples=4",
                                    "--max_new_tokens=44"])
    prompt_file = ev._prompt_file(tmp_path, args, str(toy.ASSET_DIR))
    setting = ev.Setting("per", updates=2, buffer_rounds=4, prioritized=True, alpha=1.0)
    config = ev.one_prompt_config(setting, 0, str(toy.ASSET_DIR), prompt_file, args)
    assert config.replay.prioritized and config.replay.alpha == 1.0 and config.replay.capacity == 16
    path = ev.record_path(tmp_path, "per", setting.name, 0)
    record = ev.execute(setting, 0, config, path, tmp_path / "scratch", 0.95, "avg@8")
    assert json.loads(path.read_text()) == json.loads(json.dumps(record))
    assert [i for i, _ in record["curve"]][0] == 0 and record["rounds_run"] in (1, 2)
    assert [row["iteration"] for row in record["probe"]] == list(range(1, record["rounds_run"] + 1))
    assert record["config"]["replay"]["prioritized"] is True
    assert not (tmp_path / "scratch" / f"per_{setting.name}_s0").exists()


def test_rounds_to_a_target_read_from_the_curve():
    run = _run("per_tiny", "x", 0, None, [[0, 0.3], [5, 0.59], [10, 0.6], [15, 0.55], [20, 0.7]], max_rounds=20)
    reached = ev.reached_at(run, 0.6)
    assert reached["rounds_to_target"] == 10 and reached["target"] == 0.6 and run["rounds_to_target"] is None
    assert ev.censored_rounds(ev.reached_at(run, 0.71)) == 21  # missed: max_rounds + 1
    assert ev.reached_at(run, 0.2)["rounds_to_target"] == 0


def test_per_tiny_configs_and_table():
    args = ev._parser().parse_args(["--table_rounds=20"])
    s = ev.Setting("per_tiny", updates=4, buffer_rounds=16, prioritized=True, alpha=1.0, fresh="delta")
    c = ev.table_config(s, 3, args)
    assert (c.seed, c.algorithm, c.num_iterations, c.optimizer.learning_rate) == (3, "reval", 20, 5e-4)
    assert c.replay.updates_per_iteration == 4 and c.replay.capacity == 16 * 16 * 8
    assert c.replay.prioritized and c.replay.alpha == 1.0 and c.dapo.max_extra_generations == 0
    assert c.replay.fresh_priority == "delta" and s.name == "K4_cap16_per1_fresh"
    assert ev.per_settings("per_tiny")[5].name == "K2_cap16_per0.6"
    cells = {}
    for replay, acc in (("uniform", (0.5, 0.6, 0.7)), ("per1", (0.3, 0.3, 0.3))):
        s = ev.Setting("per_tiny", updates=2, buffer_rounds=4, prioritized=replay != "uniform", alpha=1.0)
        runs = [_run("per_tiny", s.name, i, None, [[0, 0.2], [20, a]], max_rounds=20) for i, a in enumerate(acc)]
        cells[s.name] = ev.summarize_cell(runs, 10, 300)
    text = ev.per_tiny_table(cells, 300)
    row = next(line for line in text.splitlines() if line.startswith("| K=2, 4 rounds |"))
    assert row.startswith("| K=2, 4 rounds | 0.600 [0.500, 0.700], n=3 | not run | 0.300 [0.300, 0.300], n=3 | "
                          "not run | — | -0.300 [")
    assert "| K=8, 16 rounds | not run | not run | not run | not run | — | — | — |" in text


def test_dry_run_lists_what_is_left(tmp_path, capsys):
    first = ev.per_settings()[0]
    _write(tmp_path, [_run("per", first.name, 0, 10, [[0, 0.1], [10, 0.96]], seconds=30.0)])
    assert ev.main([f"--out={tmp_path}", "--dry_run", "--seeds=2", "--parts=per,table"]) == {}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "per: 47 runs left, about 24 min at 30 s per run"
    assert lines[1].startswith("table_sweep: 30 runs left") and "a guess" in lines[1]  # 6 algorithms × 5 rates
    assert lines[2].startswith("table: 0 runs left")
    with pytest.raises(SystemExit, match="unknown"):
        ev.main([f"--out={tmp_path}", "--parts=nope", "--dry_run"])
