"""Which class implements a trainer or engine backend, picked by name from the config.

`config.trainer.backend` and `config.engine.backend` name an entry here. Entries are
import paths, not imports: the launcher checks a choice (is the name known, is its extra
installed) without importing torch or the backend, and a worker process imports only the
backend it runs. A new backend is one new module and one line here.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class BackendEntry:
    target: str  # "package.module:ClassName"
    requires: tuple[str, ...] = ()  # importable modules the backend needs beyond the base install
    extra: str | None = None  # the pyproject extra that installs them
    model_parallel: bool = False  # trainers: can shard the model (tp, pp > 1), not only replicate it

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
}
_REGISTRIES = {"trainer": TRAINER_BACKENDS, "engine": ENGINE_BACKENDS}


class BackendUnavailable(ValueError):
    """The configured backend is unknown, or its extra is not installed."""


def check_backend(kind: str, name: str) -> BackendEntry:
    """The registry entry for `name`, once its required packages are known to be importable."""
    registry = _REGISTRIES[kind]
    entry = registry.get(name)
    if entry is None:
        raise BackendUnavailable(f"unknown {kind} backend {name!r}; choose one of {', '.join(sorted(registry))}")
    for module in entry.requires:
        if not _importable(module):
            raise BackendUnavailable(
                f"the {name} {kind} backend needs the {module.split('.')[0]} package ({module}), which is not "
                f"installed; install it with: pip install -e '.[{entry.extra}]'")
    return entry


def load_backend(kind: str, name: str) -> type:
    """The backend class for `name` (checked first, so a missing extra is named, not a traceback)."""
    return check_backend(kind, name).load()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
