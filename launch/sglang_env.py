"""Build the virtualenv the SGLang engine backend runs from, and print its interpreter.

    python -m launch.sglang_env                 # CPU build (the default), cached
    python -m launch.sglang_env --cuda          # CUDA build: sglang with its own kernels
    python -m launch.cluster --engine-backend sglang --sglang-python "$(python -m launch.sglang_env)"

SGLang pins its own torch and transformers (0.5.20: torch 2.13.0, transformers 5.12.1) and
~60 more packages, so it does not share tinkerd's virtualenv: engine processes of the
sglang backend run from this one, with the repository on their PYTHONPATH.

On CPU, sglang's CUDA-only requirements are left out (they cannot be imported without
libcuda) and the engine process installs three shims at start
(`actors/engine/sglang/cpu_shims.py`, written for SGLANG_VERSION). On CUDA the plain
`pip install sglang==SGLANG_VERSION` is all it takes.

The build is cached: a stamp file records what was installed, and a second call with
the same inputs only checks that `import sglang` works.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

SGLANG_VERSION = "0.5.20"
TORCH_VERSION = "2.13.0"  # what sglang 0.5.20 pins, and the CPU wheel CPU machines install
TORCHVISION_VERSION = "0.28.0"
# requirements of sglang that are CUDA builds or CUDA-only, left out of a CPU install
CUDA_ONLY = frozenset({
    "cuda-python", "cuda-tile", "flash-attn-4", "flashinfer-python", "humming-kernels", "kernels",
    "nvidia-cutlass-dsl", "nvidia-mathdx", "nvshmem4py-cu13", "quack-kernels", "sgl-deep-ep", "sgl-deep-gemm",
    "sglang-kernel", "tilelang", "tokenspeed-mla", "torch-memory-saver", "torchaudio", "torchcodec", "timm",
})
# what tinkerd's engine code needs in that virtualenv beyond sglang's own requirements
TINKERD_ENGINE_DEPS = ("msgpack>=1.0", "pyzmq>=26", "numpy", "safetensors")
STAMP = "tinkerd-sglang-env.json"


def default_env_dir(cuda: bool) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tinkerd" / f"sglang-{SGLANG_VERSION}-{'cuda' if cuda else 'cpu'}"


def _normalized(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def cpu_requirements(requires: list[str]) -> list[str]:
    """sglang's Requires-Dist lines a CPU install takes: no extras, nothing CUDA-only, no torch (pinned first)."""
    kept = []
    for line in requires:
        spec, _, marker = line.partition(";")
        if "extra ==" in marker:
            continue
        name = _normalized(spec.split("[")[0].split("=")[0].split("<")[0].split(">")[0].split("!")[0].split("~")[0])
        if name in CUDA_ONLY or name in ("torch", "torchvision"):
            continue
        kept.append(line.strip())
    return kept


def _pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
    print("tinkerd-sglang-env: " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def _stamp_of(cuda: bool) -> dict:
    return {"sglang": SGLANG_VERSION, "torch": TORCH_VERSION, "torchvision": TORCHVISION_VERSION, "cuda": cuda,
            "cuda_only": hashlib.sha256(",".join(sorted(CUDA_ONLY)).encode()).hexdigest()[:12],
            "deps": list(TINKERD_ENGINE_DEPS)}


def _sglang_requires(python: Path) -> list[str]:
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m, json; "
                                             "print(json.dumps(m.requires('sglang')))"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def build(env_dir: Path, cuda: bool) -> Path:
    python = env_dir / "bin" / "python"
    stamp_path = env_dir / STAMP
    wanted = _stamp_of(cuda)
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == wanted and _imports_sglang(python):
        return python
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    if cuda:
        _pip(python, f"sglang=={SGLANG_VERSION}", *TINKERD_ENGINE_DEPS)
    else:
        _pip(python, f"torch=={TORCH_VERSION}")
        _pip(python, "--no-deps", f"sglang=={SGLANG_VERSION}", f"torchvision=={TORCHVISION_VERSION}")
        _pip(python, f"torch=={TORCH_VERSION}", *cpu_requirements(_sglang_requires(python)), *TINKERD_ENGINE_DEPS)
    stamp_path.write_text(json.dumps(wanted))
    return python


def _imports_sglang(python: Path) -> bool:
    if not python.exists():
        return False
    check = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('sglang'))"],
                           capture_output=True, text=True)
    return check.returncode == 0 and check.stdout.strip() == SGLANG_VERSION


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuda", action="store_true", help="a CUDA build (sglang with its own kernels, no shims)")
    p.add_argument("--env-dir", type=Path, help="where to build it (default: ~/.cache/tinkerd/sglang-VERSION-KIND)")
    args = p.parse_args(argv)
    env_dir = args.env_dir or default_env_dir(args.cuda)
    print(build(env_dir.resolve(), args.cuda))
    return 0


if __name__ == "__main__":
    sys.exit(main())
