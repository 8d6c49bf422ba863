"""benchmarks/device_check.py: the comparisons flag a perturbed result, the device table, the stage
guard (a stage past its budget is stopped and recorded, the next still runs), and `--cpu-smoke`
end to end: every correctness check passes and every figure is present and finite."""

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
dc = importlib.util.module_from_spec(_spec)
sys.modules["device_check"] = dc  # dataclasses look their module up
_spec.loader.exec_module(dc)

# what each stage must report (hbm_bound_fraction and mfu need a bandwidth / peak: smoke stand-ins on CPU)
FIGURES = {
    "attention": {"xla_forward_ms", "chunked_forward_ms", "xla_grad_ms", "chunked_grad_ms", "segments"},
    "engine_greedy": {"rows_equal_fraction"},
    "update_vs_cpu": {"loss", "loss_cpu", "grad_norm", "grad_norm_cpu"},
    "engine_throughput": {"tokens_per_s", "decode_tokens_per_s", "ms_per_decode_step", "weight_bytes_per_step",
                          "kv_bytes_per_step", "bound_ms_per_decode_step", "hbm_bound_fraction", "first_call_s"},
    "update_mfu": {"seconds_per_update", "tokens_per_s", "model_tflops_per_update", "mfu", "first_call_s"},
}


def test_array_comparisons_flag_a_perturbed_result():
    want = np.random.RandomState(0).randn(4, 8, 3).astype(np.float32)
    assert dc.max_abs_check("same", want.copy(), want, dc.BF16_TOL).passed
    assert dc.relative_check("same", want.copy(), want, dc.BF16_TOL).passed
    rounded = want.astype(np.float16).astype(np.float32)  # rounding stays within the bound
    assert dc.max_abs_check("rounded", rounded, want, dc.BF16_TOL).passed
    perturbed = want.copy()
    perturbed[1, 2, 0] += 0.1
    check = dc.max_abs_check("perturbed", perturbed, want, dc.BF16_TOL)
    assert not check.passed and check.error == pytest.approx(0.1, rel=1e-5)
    where = np.ones(want.shape, bool)
    where[1, 2, 0] = False  # a padding query's output is not compared
    assert dc.max_abs_check("masked", perturbed, want, dc.BF16_TOL, where).passed
    assert not dc.relative_check("scaled", want * 1.1, want, dc.BF16_TOL).passed
    nan = want.copy()
    nan[0, 0, 0] = np.nan
    assert not dc.max_abs_check("nan", nan, want, dc.BF16_TOL).passed
    assert not dc.relative_check("nan", nan, want, dc.BF16_TOL).passed
    assert dc.relative_check("scalar", 1.01, 1.0, dc.BF16_TOL).passed
    assert not dc.relative_check("scalar", 1.1, 1.0, dc.BF16_TOL).passed
    assert dc.Check("json", 0.5, 0.25).to_json()["passed"] is False


def _tokens(rows=20, A=6, V=50, seed=0):
    """Greedy tokens [rows, A] and logits [rows, A, V] whose argmax they are, with a clear margin."""
    rng = np.random.RandomState(seed)
    logits = rng.randn(rows, A, V).astype(np.float32)
    tokens = logits.argmax(-1)
    logits[np.arange(rows)[:, None], np.arange(A)[None], tokens] += 1.0
    return tokens, logits


def test_token_comparison_accepts_near_ties_only():
    want, logits = _tokens()
    tol = dc.TIE_TOL
    check, agreement = dc.token_check(want.copy(), want, logits, tol)
    assert check.passed and agreement["rows_equal"] == 20
    got = want.copy()
    got[3, 2:] = (want[3, 2:] + 1) % 50  # row 3 parts at column 2 ...
    near = logits.copy()
    near[3, 2, got[3, 2]] = near[3, 2, want[3, 2]] - tol / 2  # ... where the two best are within tol
    check, agreement = dc.token_check(got, want, near, tol)
    assert check.passed and agreement["rows_parted_at_near_tie"] == 1
    check, agreement = dc.token_check(got, want, logits, tol)  # a clear winner: a real difference
    assert not check.passed and agreement["rows_parted_elsewhere"][0]["row"] == 3
    many = want.copy()
    many[:3, 0] = (want[:3, 0] + 1) % 50  # 3 of 20 rows part, all at near ties: too many
    tied = logits.copy()
    tied[np.arange(3), 0, many[:3, 0]] = tied[np.arange(3), 0, want[:3, 0]]
    check, agreement = dc.token_check(many, want, tied, tol)
    assert agreement["rows_parted_at_near_tie"] == 3 and not check.passed


def test_device_table_and_overrides():
    assert dc.device_spec("NVIDIA H100 80GB HBM3", False, None, None)[:2] == (3.35e12, 989e12)
    assert dc.device_spec("NVIDIA H200", False, None, None)[:2] == (4.8e12, 989e12)
    assert dc.device_spec("NVIDIA H100 PCIe", False, None, None)[:2] == (2.0e12, 756e12)
    bandwidth, peak, source = dc.device_spec("NVIDIA H100 80GB HBM3", False, 3.0e12, None)
    assert (bandwidth, peak) == (3.0e12, 989e12) and "--hbm_bandwidth" in source
    assert dc.device_spec("Some Accelerator", False, None, None)[:2] == (None, None)
    assert dc.device_spec("cpu", True, None, None)[:2] == dc.SMOKE_SPEC


def test_a_stage_past_its_budget_is_stopped_and_recorded(tmp_path):
    args = argparse.Namespace(cpu_smoke=True, hbm_bandwidth=None, peak_flops=None)
    record = dc.launch(dc.STAGES[0], args, timeout=0.5, out=tmp_path)  # importing jax alone takes longer
    assert record["status"] == "timeout" and "budget" in record["error"]
    assert not (tmp_path / "stage_attention.json").exists()


def test_a_failed_stage_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    calls = []

    def fake_launch(stage, args, timeout, out):
        calls.append((stage.name, timeout))
        if stage.name == "attention":
            return {"stage": stage.name, "status": "error", "seconds": 1.0, "error": "boom"}
        check = dc.Check("c", 0.0, 0.0).to_json()
        return {"stage": stage.name, "status": "passed", "seconds": 2.0, "checks": [check], "figures": {"x": 1.5},
                "versions": {"jax": "0.0"}, "device_kind": "cpu", "platform": "cpu"}

    monkeypatch.setattr(dc, "launch", fake_launch)
    rc = dc.main(["--cpu-smoke", f"--out={tmp_path}", "--stages=attention,engine_greedy"])
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert rc == 1 and [n for n, _ in calls] == ["attention", "engine_greedy"]
    assert [s["status"] for s in report["stages"]] == ["error", "passed"] and not report["all_checks_passed"]
    assert report["versions"] == {"jax": "0.0"}  # from the first stage that reports them
    md = (tmp_path / "device_check.md").read_text()
    assert "| attention | error | boom |" in md and "| engine_greedy | x | 1.5 |" in md
    calls.clear()
    rc = dc.main(["--cpu-smoke", f"--out={tmp_path}", "--stages=attention", "--max_seconds=5"])
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert rc == 1 and not calls and report["stages"][0]["status"] == "skipped"  # too little time left


@pytest.mark.e2e
def test_cpu_smoke_passes_every_check_with_every_figure(tmp_path):
    assert dc.main(["--cpu-smoke", f"--out={tmp_path}"]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["all_checks_passed"]
    assert report["versions"]["jax"] and report["versions"]["jaxlib"] and report["device_kind"] == "cpu"
    assert [s["stage"] for s in report["stages"]] == [s.name for s in dc.STAGES]
    for stage in report["stages"]:
        assert stage["status"] == "passed", stage
        assert stage["checks"] and all(c["passed"] for c in stage["checks"])
        assert FIGURES[stage["stage"]] <= set(stage["figures"]), stage["stage"]
        assert all(math.isfinite(x) for x in stage["figures"].values()), stage
    md = (tmp_path / "device_check.md").read_text()
    assert "| stage | quantity | value | bound | status |" in md
    assert all(f"| {s.name} | stage |" in md for s in dc.STAGES)
