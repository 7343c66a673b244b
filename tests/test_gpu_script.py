"""tests/gpu/run.sh (the one-command GPU check) without a GPU: its dry run,
its argument handling, a real run on a machine without a GPU (every stage
fails, the next still runs), and benchmarks/gpu_bench.py's stages in their
tiny CPU mode, so that the result writing the GPU run relies on runs here."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "gpu", "run.sh")
STAGES = ["build", "info", "tests", "bench-l1", "bench-gpt2", "bench-7e9"]
OUTPUTS = {"run.log", "build.log", "tests.log", "junit.xml", "bench.log", "bench.json", "bench.md", "summary.md"}

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_bench  # noqa: E402

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")


def run_script(*args, cwd=ROOT, **env):
    """Runs the script with this Python; $OUT and the build settings only when given."""
    full = {k: v for k, v in os.environ.items() if k not in ("OUT", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS")}
    full.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


def summary_rows(out):
    """{stage: status} from out/summary.md."""
    lines = (out / "summary.md").read_text().splitlines()
    assert lines[:2] == ["| stage | status | seconds | limit |", "|---|---|---:|---:|"]
    return {cells[1].strip(): cells[2].strip() for cells in (line.split("|") for line in lines[2:])}


def test_dry_run_prints_every_stage_and_writes_the_summary(tmp_path):
    out = tmp_path / "results"
    proc = run_script("--dry-run", "--out", str(out), MAX_JOBS="16", TORCH_CUDA_ARCH_LIST="9.0")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for stage in STAGES:
        assert f"== stage {stage} " in text
    for command in ("TORCH_CUDA_ARCH_LIST='9.0' MAX_JOBS=16 " + sys.executable +
                    " -m pip install --no-build-isolation --no-deps -v -e .",
                    "fastprune.build_info()", "nvidia-smi",
                    f"-m pytest -p no:cacheprovider --timeout=100 -v -rs -k 'cuda or two_devices' "
                    f"--junitxml='{out}/junit.xml' tests/test_cuda.py tests/test_cuda_in_place.py tests/test_cuda_prune.py",
                    f"benchmarks/gpu_bench.py l1 --out '{out}'", f"benchmarks/gpu_bench.py gpt2 --out '{out}'",
                    f"benchmarks/gpu_bench.py scale --out '{out}' --budget-s 80"):
        assert command in text, command
    assert {p.name for p in out.iterdir()} == {"run.log", "summary.md"}
    assert summary_rows(out) == {stage: "dry-run" for stage in STAGES}
    # The summary table is the last thing printed, and run.log holds everything printed.
    assert text.rstrip().endswith((out / "summary.md").read_text().rstrip())
    assert (out / "run.log").read_text() == text


def test_limits_fit_in_eight_minutes(tmp_path):
    proc = run_script("--dry-run", "--out", str(tmp_path))
    limits = [int(line.split("limit ")[1].split(" s")[0]) for line in proc.stdout.splitlines()
              if line.startswith("== stage ")]
    assert len(limits) == len(STAGES) and sum(limits) <= 8 * 60 - 10


def test_out_from_the_environment_and_the_default(tmp_path):
    proc = run_script("--dry-run", "--stages", "tests,bench-l1", OUT=str(tmp_path / "env"))
    assert proc.returncode == 0, proc.stderr
    assert summary_rows(tmp_path / "env") == {"tests": "dry-run", "bench-l1": "dry-run"}
    assert "== stage build" not in proc.stdout
    proc = run_script("--dry-run", "--stages", "info", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert summary_rows(tmp_path / "gpu-results") == {"info": "dry-run"}


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--stages", "build,nope"], "unknown stage 'nope'"),
    (["--stages"], "--stages needs a comma-separated list"),
    (["--out"], "--out needs a directory"),
])
def test_bad_arguments_give_a_usage_error(tmp_path, args, message):
    proc = run_script("--dry-run", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "usage: bash tests/gpu/run.sh" in proc.stderr
    assert not (tmp_path / "gpu-results").exists()


def test_help():
    proc = run_script("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ")


@no_gpu
def test_without_a_gpu_each_stage_fails_and_the_next_still_runs(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "out").mkdir()
    (out / "bench.json").write_text("stale")  # an earlier run's results are removed first
    proc = run_script("--out", str(out), "--stages", "build,info,bench-l1")
    assert proc.returncode == 1
    assert summary_rows(out) == {"build": "failed", "info": "failed", "bench-l1": "failed"}
    assert "no CUDA GPU visible to torch" in (out / "build.log").read_text()
    assert "torch sees no CUDA GPU" in (out / "bench.log").read_text()
    assert {p.name for p in out.iterdir()} == {"run.log", "summary.md", "build.log", "bench.log"}
    assert proc.stdout.rstrip().endswith((out / "summary.md").read_text().rstrip())


@no_gpu
def test_gpu_bench_refuses_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_bench.main(["l1", "--out", "unused"])
    assert e.value.code == 2 and "torch sees no CUDA GPU" in capsys.readouterr().err


def test_gpu_bench_stages_tiny_on_the_cpu(tmp_path):
    """Each stage adds to bench.json and rewrites bench.md; both name the card."""
    for stage in ("l1", "gpt2", "scale"):
        assert gpu_bench.main([stage, "--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["card"]["name"] == "cpu" and data["device"] == "cpu" and data["copy_bandwidth"] > 0
    assert data["build_info"]["running_torch_version"] == str(torch.__version__)
    rows = data["rows"]
    assert [r["workload"] for r in rows.values()] == ["l1_unstructured_1e9", "global_l1_gpt2"]
    assert all(r["masks_agree"] and r["fastprune_s"] > 0 and r["torch_s"] > 0 for r in rows.values())
    scale = data["scale"]
    assert scale["fastprune"]["outcome"] == "ok" and scale["fastprune"]["exact"]
    assert scale["fastprune"]["numel"] == sum(a * b for a, b in gpu_bench.SCALE_SHAPES[True])
    assert scale["torch"]["outcome"] == "ok"
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("# fastprune on cpu\n")
    assert "| l1_unstructured_1e9 | 100,000 |" in md and "| global_l1_gpt2 |" in md
    assert "| fastprune | 226,816 | 16 | ok, exactly k pruned |" in md
    assert {p.name for p in tmp_path.iterdir()} == {"bench.json", "bench.md"}


def test_the_7e9_shapes():
    shapes = gpu_bench.llama_like_shapes()
    assert sum(a * b for a, b in shapes) == 7_000_293_376 and len(shapes) == 2 + 7 * 32


def test_scale_records_an_error_instead_of_raising(monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("nonzero is not supported for tensors with more than INT_MAX elements\nmore")

    monkeypatch.setattr(gpu_bench.bench.SIDES["torch"], "global_unstructured", fails)
    r = gpu_bench.scale_side("torch", "cpu", tiny=True)
    assert r["outcome"] == "error" and r["seconds"] >= 0
    assert r["error"] == "RuntimeError: nonzero is not supported for tensors with more than INT_MAX elements"
    assert "| torch | 226,816 | 16 | RuntimeError: nonzero is not supported" in gpu_bench.scale_markdown({"torch": r})
