"""tinker-cookbook 0.6.1's loop recipes (sl_loop, rl_loop) against the real cluster, offline.

Each recipe runs unmodified in its own process (tests/e2e/cookbook_driver.py supplies
tiny local data and the renderer choice for the built-in model), with the tokenizer
found by the model's served name in an HF cache that actors.builtin_model writes
(`HF_HOME`, `HF_HUB_OFFLINE=1`), and the server from `TINKER_BASE_URL`.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import API_KEY, REPO_ROOT
from tests.e2e.pig_latin import WORDS, pig_latin

pytest.importorskip("tinker_cookbook", reason="install it with: pip install --no-deps tinker-cookbook==0.6.1")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUN_TIMEOUT_S = 300


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_recipe(cluster, hf_home: Path, tmp_path: Path, recipe: str, data: Path, *args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "HF_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TINKER_BASE_URL=cluster.base_url, TINKER_API_KEY=API_KEY,
               TINKER_COOKBOOK_RUNS_DIR=str(tmp_path / "runs"), TOKENIZERS_PARALLELISM="false")
    log_path = tmp_path / f"{recipe}-run"
    cmd = [sys.executable, "-m", "tests.e2e.cookbook_driver", recipe, "--data", str(data), *args,
           f"log_path={log_path}", "model_name=tinkerd/tiny-qwen3", "lora_rank=16", "save_every=0"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    metrics_file = log_path / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    return proc, metrics


def server_logs(cluster) -> str:
    logs = sorted((cluster.state_dir / "logs").glob("*.log"))
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)


def assert_completed(proc, cluster, log_path: Path) -> dict:
    """The recipe exited 0 after its final checkpoint (save_state + save_weights_for_sampler)."""
    output = proc.stdout[-4000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, f"recipe failed ({proc.returncode}):\n{output}\n{server_logs(cluster)}"
    final = json.loads((log_path / "checkpoints.jsonl").read_text().splitlines()[-1])
    assert final["name"] == "final", final
    assert final["state_path"].startswith("tinker://") and "/weights/final" in final["state_path"], final
    assert final["sampler_path"].startswith("tinker://") and "/sampler_weights/final" in final["sampler_path"], final
    return final


def run_pig_latin_sl_loop(cluster, hf_home: Path, tmp_path: Path, repeats: int):
    """sl_loop on the Pig Latin chats (WORDS `repeats` times, batches of 8): (proc, metrics, rows)."""
    rows = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": pig_latin(w)}]}
            for w in WORDS * repeats]
    data = write_jsonl(tmp_path / "pig_latin.jsonl", rows)
    proc, metrics = run_recipe(cluster, hf_home, tmp_path, "sl", data,
                               "batch_size=8", "learning_rate=5e-3", "max_length=128")
    return proc, metrics, rows


def test_sl_loop_pig_latin_loss_falls(cluster, cookbook_hf_home, tmp_path):
    proc, metrics, rows = run_pig_latin_sl_loop(cluster, cookbook_hf_home, tmp_path, repeats=3)
    nll = [m["train_mean_nll"] for m in metrics]
    assert len(nll) == len(rows) // 8, (nll, proc.stderr[-4000:])
    assert all(math.isfinite(x) for x in nll), nll
    assert [m["num_sequences"] for m in metrics] == [8] * len(nll)
    assert nll[-1] < 0.75 * nll[0], nll
    assert sum(nll[-2:]) < sum(nll[:2]), nll
    final = assert_completed(proc, cluster, tmp_path / "sl-run")

    # run again in the same log_path: the recipe resumes from its final checkpoint
    # (create_training_client_from_state_with_optimizer), has no batch left, and saves again
    proc, metrics, _ = run_pig_latin_sl_loop(cluster, cookbook_hf_home, tmp_path, repeats=3)
    assert f"Resuming from batch {len(nll)}" in proc.stdout + proc.stderr, proc.stderr[-4000:]
    assert len(metrics) == len(nll)
    again = assert_completed(proc, cluster, tmp_path / "sl-run")
    assert again["state_path"] != final["state_path"]  # a new training run


def arithmetic_rows(n: int) -> list[dict]:
    """GSM8K-shaped rows: the recipe reads `question` and the `#### N` final answer."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


RL_ARGS = ("--shaped-reward", "batch_size=2", "group_size=4", "max_tokens=16", "learning_rate=1e-3", "max_steps=3")


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "cispo", "gspo"])
def test_rl_loop_runs_with_finite_metrics(cluster, cookbook_hf_home, tmp_path, loss_fn):
    data = write_jsonl(tmp_path / "arithmetic.jsonl", arithmetic_rows(8))
    proc, metrics = run_recipe(cluster, cookbook_hf_home, tmp_path, "rl", data, *RL_ARGS, f"loss_fn={loss_fn}")
    assert [m["progress/batch"] for m in metrics] == [0, 1, 2], proc.stderr[-4000:]
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, (int, float))), m
    # a step trains only when some group's rewards differ; the shaped reward almost always does
    trained = [m for m in metrics if "grad_norm:mean" in m]
    assert trained, metrics
    assert all(m["grad_norm:mean"] > 0 for m in trained), metrics
    assert_completed(proc, cluster, tmp_path / "rl-run")


def test_rl_loop_default_stable_reinforce_reward_rises(cluster, cookbook_hf_home, tmp_path):
    """rl_loop's default loss: stable_reinforce on samples recorded with record_stability_info.

    When the reward takes off varies from run to run (random LoRA init and samples); it has
    within 16 steps in every trial run, but the test asks only for a clear rise.
    """
    data = write_jsonl(tmp_path / "arithmetic.jsonl", arithmetic_rows(64))
    proc, metrics = run_recipe(cluster, cookbook_hf_home, tmp_path, "rl", data, "--shaped-reward", "batch_size=4",
                               "group_size=8", "max_tokens=16", "learning_rate=2e-2", "max_steps=16")
    rewards = [m["reward/total"] for m in metrics]
    print("rl_loop stable_reinforce reward per step:", [round(r, 3) for r in rewards])
    assert len(rewards) == 16, proc.stderr[-4000:]
    assert all(math.isfinite(v) for m in metrics for v in m.values() if isinstance(v, (int, float))), metrics
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > 1.5 * first and last > first + 0.05, rewards
    assert_completed(proc, cluster, tmp_path / "rl-run")
