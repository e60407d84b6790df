"""Which class implements a trainer or engine backend, picked by name from the config.

`config.trainer.backend` and `config.engine.backend` name an entry here. Entries are
import paths, not imports: the launcher checks a choice (is the name known, is its extra
installed) without importing torch or the backend, and a worker process imports only the
backend it runs. A new backend is one new module and one line here.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class BackendEntry:
    target: str  # "package.module:ClassName"
    requires: tuple[str, ...] = ()  # importable modules the backend needs beyond the base install
    extra: str | None = None  # the pyproject extra that installs them
    model_parallel: bool = False  # trainers: can shard the model (tp, pp > 1), not only replicate it
    own_python: bool = False  # runs from an interpreter of its own, where `requires` is checked instead

    def load(self) -> type:
        module_name, _, class_name = self.target.partition(":")
        return getattr(importlib.import_module(module_name), class_name)


TRAINER_BACKENDS = {
    "torch": BackendEntry("actors.trainer.torch_backend:TorchTrainerBackend"),
    "megatron": BackendEntry("actors.trainer.megatron.backend:MegatronTrainerBackend",
                             requires=("megatron.core",), extra="megatron", model_parallel=True),
}
ENGINE_BACKENDS = {
    "torch": BackendEntry("actors.engine.torch_backend:TorchEngineBackend"),
    # runs from SGLang's own virtualenv (--sglang-python; launch/sglang_env.py builds it), not this one
    "sglang": BackendEntry("actors.engine.sglang.backend:SglangEngineBackend", requires=("sglang",),
                           own_python=True),
}
_REGISTRIES = {"trainer": TRAINER_BACKENDS, "engine": ENGINE_BACKENDS}


class BackendUnavailable(ValueError):
    """The configured backend is unknown, or its extra is not installed."""


def check_backend(kind: str, name: str, python: str | None = None) -> BackendEntry:
    """The registry entry for `name`, once its required packages are known to be importable
    (here, or by the interpreter `python` that will run it)."""
    registry = _REGISTRIES[kind]
    entry = registry.get(name)
    if entry is None:
        raise BackendUnavailable(f"unknown {kind} backend {name!r}; choose one of {', '.join(sorted(registry))}")
    for module in entry.requires:
        if not (_importable(module) if python is None else _importable_by(python, module)):
            where = "" if python is None else f" for {python}"
            how = ("build its virtualenv with `python -m launch.sglang_env` and pass its interpreter"
                   if entry.own_python else f"install it with: pip install -e '.[{entry.extra}]'")
            raise BackendUnavailable(f"the {name} {kind} backend needs the {module.split('.')[0]} package "
                                     f"({module}), which is not installed{where}; {how}")
    return entry


def load_backend(kind: str, name: str) -> type:
    """The backend class for `name` (checked first, so a missing extra is named, not a traceback)."""
    return check_backend(kind, name).load()


def _importable_by(python: str, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
