"""The benchmark's quick mode runs end to end, its correctness checks included."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench  # noqa: E402


def test_quick_benchmark_runs_and_masks_match(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "quick.json").read_text())
    names = [r["workload"] for r in result["rows"]]
    assert names == list(bench.WORKLOADS)
    assert all(r["masks_agree"] for r in result["rows"])
    assert all(r["torch_s"] > 0 and r["fastprune_s"] > 0 for r in result["rows"])
    for r in result["rows"]:  # interleaved rounds: median and worst of the same calls
        for side in ("torch", "fastprune"):
            assert r[f"{side}_s"] == sorted(r[f"{side}_times_s"])[len(r[f"{side}_times_s"]) // 2]
            assert r[f"{side}_worst_s"] == max(r[f"{side}_times_s"])
        assert r["fastprune_best_s"] > 0 and r["fresh_floor_s"] >= r["floor_s"] > 0
    assert result["fresh_page_cost_s_per_byte"] >= 0
    patched = [r for r in result["rows"] if "patched_s" in r]  # the patch next to the direct import
    assert [r["workload"] for r in patched] == ["l1_unstructured"] and patched[0]["patched_s"] > 0
    assert (tmp_path / "quick.md").read_text().count("\n") >= len(names) + 3
    assert (tmp_path / "quick.png").stat().st_size > 0


def test_mismatch_is_reported_not_skipped(tmp_path, monkeypatch):
    """A fastprune mask that differs from the reference makes the run fail loudly."""
    real = bench.SIDES["fastprune"].l1_unstructured

    def wrong(module, name, amount, importance_scores=None):
        real(module, name, amount=amount, importance_scores=importance_scores)
        getattr(module, name + "_mask").view(-1)[:1] = 1 - getattr(module, name + "_mask").view(-1)[:1]
        return module

    monkeypatch.setattr(bench.SIDES["fastprune"], "l1_unstructured", wrong)
    assert bench.main(["--quick", "--no-sweep", "--workloads", "l1_unstructured", "--out", str(tmp_path)]) == 1
    row = json.loads((tmp_path / "quick.json").read_text())["rows"][0]
    assert row["masks_agree"] is False


def test_first_call_runs_in_a_fresh_process():
    """The first-call figures come from a child process that prunes once."""
    got = bench.first_call("iterative", "fastprune", bench.torch.float32, quick=True)
    assert got["first_s"] > 0 and got["peak_bytes"] >= 0


@pytest.mark.parametrize("n", [0, 5])
def test_tie_free_inputs_have_distinct_magnitudes(n):
    t = bench.tie_free((n, 3))
    assert t.abs().unique().numel() == t.numel()
