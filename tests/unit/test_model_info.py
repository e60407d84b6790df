"""The launcher's model summary: read from config.json without torch where that gives AutoConfig's answer,
and left to AutoConfig (in a subprocess, in the launcher) everywhere else."""

from __future__ import annotations

import json
import shutil

from actors.model_info import describe_model, local_summary


def test_a_local_config_is_read_as_autoconfig_reads_it(builtin_model_dir):
    assert local_summary(str(builtin_model_dir)) == describe_model(str(builtin_model_dir))


def test_whatever_the_json_alone_cannot_say_is_left_to_autoconfig(builtin_model_dir, tmp_path):
    assert local_summary("Qwen/Qwen3-0.6B") is None  # a hub id: no directory here
    config = json.loads((builtin_model_dir / "config.json").read_text())
    for name, change in [("default-vocab", {"vocab_size": None}),
                         ("default-context", {"max_position_embeddings": None}),
                         ("other-arch", {"model_type": "mistral"})]:
        directory = tmp_path / name
        shutil.copytree(builtin_model_dir, directory)
        edited = {k: v for k, v in {**config, **change}.items() if v is not None}
        (directory / "config.json").write_text(json.dumps(edited))
        assert local_summary(str(directory)) is None, name
