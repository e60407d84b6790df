"""The benchmark suite runs end to end (tiny sizes, one repetition): it must not rot.

Not a timed test: it checks that `python -m tests.bench` starts tinkerd, runs every
workload, the raw baseline and the SDK floor (the stub server), and writes a valid
results JSON and PNG. The latency calls get one warm-up and three calls, so that every
figure has a median, a min and a max. Which is faster, tinkerd or the floor, is a timing
and not checked: at these sizes (a 1-token sample) the two were within noise of each other,
and a check that the stub's fastest call beat tinkerd's median failed in CI, the floor
measured minutes apart from the server while the VM's speed drifted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e

TINY = ["--train-batch", "2", "--train-seq", "16", "--sample-prompts", "2", "--sample-n", "2",
        "--sample-tokens", "4", "--prompt-len", "8", "--warmup", "0", "--reps", "1",
        "--latency-warmup", "1", "--latency-reps", "3", "--cold-reps", "1",
        "--tenant-batch", "1", "--tenant-seq", "8", "--tenant-steps", "1", "--tenant-counts", "1,2"]
LATENCY = ["roundtrip_ms", "sample_first_result_ms", "sync_sampling_client_ms", "sync_named_ms", "cold_first_result_s"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, models_dir):
    out = tmp_path_factory.mktemp("bench-out")
    cache = tmp_path_factory.mktemp("bench-cache")
    # the session's built-in model, so the suite builds nothing
    (cache / "models").symlink_to(models_dir, target_is_directory=True)
    proc = subprocess.run([sys.executable, "-m", "tests.bench", "--out", str(out), "--cache-dir", str(cache), *TINY],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


def _figures(out):
    result = json.loads((out / "bench.json").read_text())
    return result, {f["key"]: f for f in result["figures"]}


def test_writes_results_json_with_every_figure(bench_run):
    out, stdout = bench_run
    result, figures = _figures(out)
    assert result["schema"] == "tinkerd-bench/2"
    assert result["errors"] == {}
    assert result["raw"]["ran"] and result["floor"]["ran"] and result["floor"]["runs"] == 2
    assert result["target"]["kind"] == "tinkerd"
    assert list(figures) == ["roundtrip_ms", "train_tokens_per_s", "sample_tokens_per_s", "sample_first_result_ms",
                             "sync_sampling_client_ms", "sync_named_ms", "cold_launch_s", "cold_first_result_s",
                             "tenants_1_tokens_per_s", "tenants_2_tokens_per_s"]
    assert result["raw"]["runs"] == 2  # before and after the server: its samples pooled
    for key, figure in figures.items():
        for side, runs in (("server", 1), ("raw", 2)):
            stats = figure[side]
            reps = 3 if key in LATENCY and key != "cold_first_result_s" else 1
            assert stats["n"] == reps * runs and stats["median"] > 0, (key, side, stats)
            assert stats["min"] <= stats["median"] <= stats["max"]
        assert figure["ratio"] == pytest.approx(figure["server"]["median"] / figure["raw"]["median"])
    assert "train_tokens_per_s" in stdout and "ratio" in stdout  # the printed table


def test_latency_figures_have_the_sdk_floor_and_the_overhead_above_it(bench_run):
    out, stdout = bench_run
    _, figures = _figures(out)
    for key in LATENCY:
        figure = figures[key]
        floor, server, raw = figure["floor"], figure["server"], figure["raw"]
        # two runs of the stub, before and after the server, pooled as the raw baseline's are
        assert floor["n"] == 3 * 2 and 0 < floor["min"] <= floor["median"] <= floor["max"], (key, floor)
        scale = 1e3 if figure["unit"] == "s" else 1.0
        assert figure["overhead_ms"] == pytest.approx((server["median"] - raw["median"] - floor["median"]) * scale)
    for key in ("train_tokens_per_s", "sample_tokens_per_s", "cold_launch_s"):
        assert figures[key]["floor"] is None and figures[key]["overhead_ms"] is None
    assert "SDK floor" in stdout and "over raw+floor" in stdout


def test_tenants_report_aggregate_throughput_and_scaling(bench_run):
    out, _ = bench_run
    result, figures = _figures(out)
    one, two = figures["tenants_1_tokens_per_s"], figures["tenants_2_tokens_per_s"]
    for figure in (one, two):
        assert figure["server"]["median"] > 0 and figure["floor"]["median"] > 0
    assert one["scaling"] == 1.0
    assert two["scaling"] == pytest.approx(two["server"]["median"] / one["server"]["median"])
    assert result["tenants"] == {"counts": [1, 2], "scaling": {"1": 1.0, "2": two["scaling"]}}
    assert "began at most" in two["note"]  # the start signal's spread is recorded


def test_targets_are_checked(bench_run):
    out, stdout = bench_run
    result, figures = _figures(out)
    targets = {t["figure"]: t for t in result["targets"]}
    assert len(targets) == 8
    for key in LATENCY[:4]:
        assert targets[key]["value"] == pytest.approx(figures[key]["overhead_ms"])
        assert targets[key]["pass"] is (targets[key]["value"] <= 3.0)
    assert targets["train_tokens_per_s"]["value"] == pytest.approx(figures["train_tokens_per_s"]["ratio"])
    assert targets["tenants_8_tokens_per_s"]["pass"] is None  # 8 tenants were not run at these sizes
    assert "targets:" in stdout and ("PASS" in stdout or "MISS" in stdout)


def test_report_prints_the_results_file_again_with_markdown(bench_run):
    out, _ = bench_run
    proc = subprocess.run([sys.executable, "-m", "tests.bench.report", str(out / "bench.json")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "tenants_2_tokens_per_s" in proc.stdout and "| target | measured | result |" in proc.stdout


def test_writes_png_chart(bench_run):
    out, _ = bench_run
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_help_names_every_workload():
    proc = subprocess.run([sys.executable, "-m", "tests.bench", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for word in ("--base-url", "--model", "--model-config", "--out", "round trip", "cold start", "tenants",
                 "--tenant-counts", "SDK floor", "--no-floor"):
        assert word in proc.stdout
