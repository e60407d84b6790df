"""install_into_hf_cache: the built-in model found by its served name, offline, from HF_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from actors.builtin_model import BUILTIN_MODEL_NAME, hf_cache_repo_dir, install_into_hf_cache

LOAD_BY_NAME = """
import json, sys
from transformers import AutoConfig, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
chat = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
print(json.dumps({"vocab": len(tok), "eos": tok.eos_token, "chat": chat,
                  "ids": tok.encode("hello world", add_special_tokens=False),
                  "model_type": AutoConfig.from_pretrained(sys.argv[1]).model_type}))
"""


def load_by_name(hf_home, name=BUILTIN_MODEL_NAME) -> subprocess.CompletedProcess:
    # huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import: a fresh process
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", LOAD_BY_NAME, name], env=env, capture_output=True, text=True,
                          timeout=120)


def test_tokenizer_and_config_load_by_served_name_offline(builtin_model_dir, tmp_path):
    from transformers import AutoTokenizer

    snapshot = install_into_hf_cache(builtin_model_dir, tmp_path / "hf")
    repo = hf_cache_repo_dir(tmp_path / "hf")
    assert repo == tmp_path / "hf" / "hub" / "models--tinkerd--tiny-qwen3"
    assert (repo / "refs" / "main").read_text() == snapshot.name and len(snapshot.name) == 40
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in snapshot.iterdir()}
    assert not (snapshot / "tinkerd_builtin.json").exists()

    out = load_by_name(tmp_path / "hf")
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    local = AutoTokenizer.from_pretrained(str(builtin_model_dir))
    assert got["vocab"] == len(local) and got["eos"] == "<|im_end|>" and got["model_type"] == "qwen3"
    assert got["ids"] == local.encode("hello world", add_special_tokens=False)
    assert got["chat"] == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_install_is_idempotent_and_a_changed_model_gets_a_new_revision(builtin_model_dir, tmp_path):
    first = install_into_hf_cache(builtin_model_dir, tmp_path / "hf")
    assert install_into_hf_cache(builtin_model_dir, tmp_path / "hf") == first
    changed = tmp_path / "changed"
    changed.mkdir()
    for p in builtin_model_dir.iterdir():
        (changed / p.name).write_bytes(p.read_bytes())
    (changed / "generation_config.json").write_text('{"max_new_tokens": 7}')
    second = install_into_hf_cache(changed, tmp_path / "hf")
    assert second != first and first.is_dir()
    assert (hf_cache_repo_dir(tmp_path / "hf") / "refs" / "main").read_text() == second.name
    assert len(list((hf_cache_repo_dir(tmp_path / "hf") / "snapshots").iterdir())) == 2  # no staging dir left


def test_without_the_cache_the_name_does_not_resolve_offline(tmp_path):
    out = load_by_name(tmp_path / "empty")
    assert out.returncode != 0
