"""The in-place benchmark's quick mode runs end to end, its correctness checks included."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import in_place_bench  # noqa: E402


def test_quick_in_place_benchmark_runs_and_checks_pass(tmp_path):
    assert in_place_bench.main(["--quick", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "in_place_quick.json").read_text())
    assert r["quick"] is True and r["copy_bandwidth"] > 0
    assert {"cpu", "cores", "threads", "torch", "date"} <= set(r["machine"])
    model = r["model"]
    assert model["numel"] == model["blocks"] * (4 * model["dim"] ** 2 + 3 * model["dim"] * model["mlp"])
    for key in ("global_l1", "per_row"):
        p = r[key]
        checks = p["checks"]
        assert checks["ok"] and checks["layout_ok"] and checks["count_ok"] and checks["pruned_are_zero"]
        assert checks["sample_order_ok"] and checks["sample_values_ok"]
        assert checks["pruned"] == checks["expected_pruned"] == model["numel"] // 2
        assert checks["pruned_nonzero"] == 0 and checks["numel"] == model["numel"]
        assert p["mask_bytes"] == model["numel"] // 8  # 1 bit per weight (rows are multiples of 8)
        assert p["time_s"] > 0 and p["floor_s"] > 0 and p["floor_bytes"] > 0 and p["peak_growth_bytes"] >= 0
        assert p["time_over_floor"] * p["fraction_of_floor"] == pytest.approx(1)
        assert p["growth_over_masks"] == p["peak_growth_bytes"] / p["mask_bytes"]
    ref = r["reference"]
    assert ref["peak_growth_bytes"] == sum(ref["peak_items_bytes"].values()) > ref["steady_growth_bytes"] > 0
    assert ref["layout_bytes"] == 3 * model["numel"] * 2  # bf16: orig + mask + pruned
    cal = ref["calibration"]
    assert cal["time_s"] > 0 and cal["measured_peak_per_entry"] > 0 and cal["arithmetic_peak_per_entry"] > 0
    pl = r["per_layer"]
    assert len(pl["samples"]) == 3 and pl["layers"] == 7 * model["blocks"]
    assert all(s["torch_s"] > 0 and s["fastprune_s"] > 0 for s in pl["samples"])
    assert pl["torch_extrapolated_s"] > 0 and pl["fastprune_extrapolated_s"] > 0
    train = r["train"]
    assert train["masks_agree"] and train["in_place_still_pruned"]
    assert set(train["optimizers"]) == set(in_place_bench.OPTIMIZERS)
    assert train["variants"] == train["optimizers"]["adamw"]["variants"]  # the headline
    for o in train["optimizers"].values():
        assert o["masks_agree"] and o["in_place_still_pruned"] and o["max_abs_diff_reference_vs_in_place"] >= 0
        assert set(o["variants"]) == {"unpruned", "reference", "in_place_bits"}
        for v in o["variants"].values():
            assert len(v["times_s"]) == train["config"]["rounds"] and min(v["times_s"]) > 0
            assert v["median_s"] > 0 and v["worst_s"] == max(v["times_s"]) and v["ratio_to_unpruned"] > 0
            assert all(v[phase] > 0 for phase in in_place_bench.PHASES)
        assert o["variants"]["unpruned"]["ratio_to_unpruned"] == 1
    assert [t["met"] in (True, False) for t in r["targets"]] == [True] * (2 + len(in_place_bench.OPTIMIZERS))
    md = (tmp_path / "in_place_quick.md").read_text()
    for text in ("copy bandwidth", "global_unstructured L1Unstructured 0.5", "per-row", "cannot run here",
                 "**extrapolated**", "in_place_bits", "Targets"):
        assert text in md
    assert "FAILED" not in md and "**NO**" not in md


def test_the_checks_bit_helpers_match_fastprune():
    """The checks read the bits with plain torch ops, independently of the kernels."""
    import torch

    import fastprune.ops

    mask = torch.rand(5, 29, generator=torch.Generator().manual_seed(0)) > 0.4
    bits = fastprune.ops.pack_mask(mask)
    assert torch.equal(in_place_bench.unpack_bits(bits, 29), mask)
    assert in_place_bench.popcount(bits) == int(mask.sum())
