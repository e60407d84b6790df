"""The SDK's own `tinker` CLI against tinkerd, as a subprocess (base URL and key from the environment).

`tinker checkpoint download` of a training checkpoint is the long way round: it creates
a training run from the checkpoint, exports it with save_weights_external, asks for the
files' URLs, renews the export's TTL, fetches each URL with a plain GET, deletes the
export and finishes its session. The files it writes must be the PEFT adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from tests.e2e.conftest import API_KEY, BUILTIN_MODEL
from tests.e2e.pig_latin import WORDS, sft_batch, train_steps

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cli(cluster):
    env = {**os.environ, "TINKER_BASE_URL": cluster.base_url, "TINKER_API_KEY": API_KEY, "TINKER_TELEMETRY": "0"}

    def run(*args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "tinker.cli", "--format", "json", *args], env=env,
                             capture_output=True, text=True, timeout=120)
        if expect_ok:
            assert out.returncode == 0, f"tinker {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
        return out

    return run


@pytest.fixture(scope="module")
def saved(cluster):
    client = cluster.service_client()
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4, seed=11).result()
    train_steps(tc, sft_batch(tc.get_tokenizer(), WORDS[:4]), steps=2)
    paths = {"state": tc.save_state("cli-state").result().path,
             "sampler": tc.save_weights_for_sampler("cli-sampler").result().path}
    yield tc.model_id, paths
    client.close("success").result()


def _run_checkpoints(cli, run_id: str) -> dict[str, dict]:
    listed = json.loads(cli("checkpoint", "list", "--run-id", run_id).stdout)
    return {c["checkpoint_id"]: c for c in listed["checkpoints"]}


def test_model_list_shows_the_served_model(cli):
    models = json.loads(cli("model", "list").stdout)
    assert BUILTIN_MODEL in json.dumps(models)


def test_run_list_and_checkpoint_list_info(cli, saved):
    run_id, paths = saved
    runs = json.loads(cli("run", "list").stdout)["runs"]
    assert run_id in [r["training_run_id"] for r in runs]
    assert set(_run_checkpoints(cli, run_id)) == {"weights/cli-state", "sampler_weights/cli-sampler"}
    mine = json.loads(cli("checkpoint", "list", "--limit", "0").stdout)["checkpoints"]
    assert {paths["state"], paths["sampler"]} <= {c["tinker_path"] for c in mine}
    info = json.loads(cli("checkpoint", "info", paths["state"]).stdout)
    assert (info["tinker_path"], info["checkpoint_type"], info["lora_rank"]) == (paths["state"], "training", 4)


def test_publish_unpublish_and_ttl(cli, saved):
    run_id, paths = saved
    cli("checkpoint", "publish", paths["sampler"])
    cli("checkpoint", "set-ttl", paths["sampler"], "--ttl", "7200")
    got = _run_checkpoints(cli, run_id)["sampler_weights/cli-sampler"]
    assert got["public"] is True and got["expires_at"] is not None
    cli("checkpoint", "unpublish", paths["sampler"])
    cli("checkpoint", "set-ttl", paths["sampler"], "--remove")
    got = _run_checkpoints(cli, run_id)["sampler_weights/cli-sampler"]
    assert got["public"] is False and got["expires_at"] is None
    missing = cli("checkpoint", "publish", paths["sampler"].replace("cli-sampler", "nope"), expect_ok=False)
    assert missing.returncode != 0 and "no checkpoint" in missing.stdout + missing.stderr


def test_download_of_a_training_checkpoint_gives_the_peft_adapter(cluster, cli, saved, tmp_path):
    run_id, paths = saved
    out = json.loads(cli("checkpoint", "download", paths["state"], "--output", str(tmp_path)).stdout)
    target = Path(out["destination"])
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    source = Path(cluster.state_dir) / "checkpoints" / paths["state"].removeprefix("tinker://")
    downloaded, original = load_file(target / "adapter_model.safetensors"), load_file(source /
                                                                                     "adapter_model.safetensors")
    assert downloaded.keys() == original.keys() and len(downloaded) > 0
    for name, tensor in original.items():
        assert (downloaded[name] == tensor).all(), name
    config = json.loads((target / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["base_model_name_or_path"]) == ("LORA", 4, BUILTIN_MODEL)

    # the export went through a training run of its own, and was deleted afterwards
    runs = json.loads(cli("run", "list", "--limit", "0").stdout)["runs"]
    export_runs = [r["training_run_id"] for r in runs if r.get("user_metadata", {}).get("created_by")]
    assert export_runs and not any(c.startswith("external_weights/")
                                   for c in _run_checkpoints(cli, export_runs[0]))


def test_delete(cluster, cli, saved):
    run_id, paths = saved
    out = cli("checkpoint", "delete", "--yes", paths["sampler"])
    assert json.loads(out.stdout)["deleted_count"] == 1
    assert set(_run_checkpoints(cli, run_id)) == {"weights/cli-state"}
    assert not (Path(cluster.state_dir) / "checkpoints" / paths["sampler"].removeprefix("tinker://")).exists()
