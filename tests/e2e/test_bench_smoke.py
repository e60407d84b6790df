"""The benchmark suite runs end to end (tiny sizes, one repetition): it must not rot.

Not a timed test: it checks that `python -m tests.bench` starts tinkerd, runs every
workload and the raw baseline, and writes a valid results JSON and PNG.
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
        "--latency-warmup", "0", "--latency-reps", "1", "--cold-reps", "1"]


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


def test_writes_results_json_with_every_figure(bench_run):
    out, stdout = bench_run
    result = json.loads((out / "bench.json").read_text())
    assert result["schema"] == "tinkerd-bench/1"
    assert result["errors"] == {}
    assert result["raw"]["ran"]
    assert result["target"]["kind"] == "tinkerd"
    keys = [f["key"] for f in result["figures"]]
    assert keys == ["roundtrip_ms", "train_tokens_per_s", "sample_tokens_per_s", "sample_first_result_ms",
                    "sync_sampling_client_ms", "sync_named_ms", "cold_launch_s", "cold_first_result_s"]
    for figure in result["figures"]:
        for side in ("server", "raw"):
            stats = figure[side]
            assert stats["n"] == 1 and stats["median"] > 0, (figure["key"], side, stats)
            assert stats["min"] <= stats["median"] <= stats["max"]
        assert figure["ratio"] == pytest.approx(figure["server"]["median"] / figure["raw"]["median"])
    assert "train_tokens_per_s" in stdout and "ratio" in stdout  # the printed table


def test_writes_png_chart(bench_run):
    out, _ = bench_run
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_help_names_every_workload():
    proc = subprocess.run([sys.executable, "-m", "tests.bench", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for word in ("--base-url", "--model", "--model-config", "--out", "round trip", "cold start"):
        assert word in proc.stdout
