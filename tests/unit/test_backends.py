"""Backends are picked by name, and a bad choice or layout is refused before anything starts."""

from __future__ import annotations

import pytest

import cluster.backends as backends
from cluster.backends import BackendEntry, BackendUnavailable, check_backend, load_backend
from cluster.config import ClusterConfig, ModelConfig, TrainerConfig
from cluster.messages import RankCoords
from cluster.parallel import ParallelDims
from launch.cluster import parse_args


def test_backends_load_by_name():
    from actors.engine.torch_backend import TorchEngineBackend
    from actors.trainer.interface import TrainerBackend
    from actors.trainer.torch_backend import TorchTrainerBackend

    assert load_backend("trainer", "torch") is TorchTrainerBackend
    assert issubclass(TorchTrainerBackend, TrainerBackend)
    assert load_backend("engine", "torch") is TorchEngineBackend


def test_an_unknown_backend_is_named_with_the_choices():
    with pytest.raises(BackendUnavailable, match=r"unknown trainer backend 'jax'; choose one of megatron, torch"):
        check_backend("trainer", "jax")


def test_a_backend_whose_extra_is_missing_names_the_package_and_the_extra(monkeypatch):
    # an entry needing a package that is certainly not installed stands in for an extra
    # that is not installed (CI installs every extra, so the real ones are all present)
    monkeypatch.setitem(backends.TRAINER_BACKENDS, "future",
                        BackendEntry("no_such_package.backend:X", requires=("no_such_package.core",), extra="future"))
    with pytest.raises(BackendUnavailable) as caught:
        load_backend("trainer", "future")
    assert "needs the no_such_package package (no_such_package.core)" in str(caught.value)
    assert "pip install -e '.[future]'" in str(caught.value)


def test_parallel_dims_number_ranks_as_megatron_does():
    dims = ParallelDims.for_world(8, tp=2, pp=2)
    assert dims == ParallelDims(dp=2, tp=2, pp=2)
    assert [dims.coords(r) for r in (0, 1, 2, 5, 7)] == [
        RankCoords(dp=0, tp=0, pp=0), RankCoords(dp=0, tp=1, pp=0), RankCoords(dp=1, tp=0, pp=0),
        RankCoords(dp=0, tp=1, pp=1), RankCoords(dp=1, tp=1, pp=1)]
    assert all(dims.rank_of(dims.coords(r)) == r for r in range(8))
    assert [dims.reporting_rank(dp) for dp in range(2)] == [4, 6]  # last stage, TP rank 0
    with pytest.raises(ValueError, match="must be a multiple of tp\\*pp = 4"):
        ParallelDims.for_world(6, tp=2, pp=2)
    with pytest.raises(ValueError, match="positive integer"):
        ParallelDims(dp=0)


@pytest.mark.parametrize("argv, words", [
    (["--tp", "2", "--trainer-ranks", "2"], "the torch trainer backend runs data parallel only"),
    (["--trainer-backend", "megatron", "--tp", "2", "--trainer-ranks", "3"], "must be a multiple of tp*pp = 2"),
    (["--trainer-backend", "megatron", "--pp", "0"], "--tp and --pp must be at least 1"),
    (["--trainer-timeout", "0"], "--trainer-timeout must be positive"),
])
def test_the_launcher_refuses_a_bad_layout_at_once(argv, words, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert words in capsys.readouterr().err


def test_the_launcher_passes_the_layout_on():
    from launch.cluster import build_config

    args = parse_args(["--trainer-backend", "megatron", "--tp", "2", "--pp", "2", "--trainer-ranks", "8",
                       "--trainer-timeout", "30"])
    config = build_config(args, ModelConfig(name="m", path="/m"))
    assert (config.trainer.backend, config.trainer.tp, config.trainer.pp) == ("megatron", 2, 2)
    assert config.trainer.parallel_dims() == ParallelDims(dp=2, tp=2, pp=2)
    assert config.trainer.call_timeout_s == 30
    assert parse_args(["--trainer-backend", "megatron", "--tp", "2"]).trainer_ranks == 2  # dp 1 by default
    assert parse_args([]).trainer_ranks == 1


def test_the_torch_backend_refuses_model_parallel_layouts():
    from actors.trainer.torch_backend import TorchTrainerBackend

    config = ClusterConfig(model=ModelConfig(path="/unused"), trainer=TrainerConfig(ranks=2, tp=2))
    with pytest.raises(ValueError, match="runs data parallel only, not dp=1 tp=2 pp=1"):
        TorchTrainerBackend(config, rank=0, world_size=2)


def test_the_sglang_backend_is_checked_in_its_own_interpreter(capsys):
    """sglang is importable only from its virtualenv: the launcher asks that interpreter, not itself."""
    import sys

    with pytest.raises(BackendUnavailable) as caught:  # this interpreter has no sglang
        check_backend("engine", "sglang", python=sys.executable)
    assert f"not installed for {sys.executable}" in str(caught.value)
    assert "python -m launch.sglang_env" in str(caught.value)
    with pytest.raises(SystemExit):
        parse_args(["--engine-backend", "sglang", "--sglang-python", sys.executable])
    assert "needs the sglang package" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--sglang-python", sys.executable])  # the torch engine would silently ignore it
    assert "--sglang-python is for --engine-backend sglang" in capsys.readouterr().err


def test_the_launcher_passes_the_engine_backend_on(sglang_python):
    from launch.cluster import build_config

    args = parse_args(["--engine-backend", "sglang", "--sglang-python", str(sglang_python),
                       "--max-loras-per-batch", "3", "--heartbeat-timeout", "4"])
    config = build_config(args, ModelConfig(path="/m", name="m"))
    assert (config.engine.backend, config.engine.sglang_python) == ("sglang", str(sglang_python))
    assert config.engine.max_loras_per_batch == 3 and config.controller.heartbeat_timeout_s == 4
