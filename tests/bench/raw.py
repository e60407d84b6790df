"""The raw baseline: the benchmark's work done with plain torch + transformers, in one process.

    python -m tests.bench.raw --model DIR [--device cuda --dtype bfloat16] [size flags] --json-out FILE

This is the limit tinkerd is measured against: the same model (loaded the way tinkerd
loads it: `from_pretrained`, sdpa attention, eval mode), the same LoRA shape (rank r,
alpha 32, on every attention and MLP projection and on lm_head, B = 0 at the start),
the same batches (tests/bench/spec.py), but no processes, sockets, HTTP, futures,
slots or validation: forward + backward + `torch.optim.AdamW` for training, and
transformers' `generate` with its KV cache for sampling. Nothing here imports tinkerd.

Run it while nothing else computes (the benchmark runs it before it starts the server).
`--cold` is internal: a fresh process that reports when it has loaded the model and when
its first forward + backward is done (the cold-start baseline; the parent times it).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.utils import logging as hf_logging

from tests.bench import spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


class LoraLinear(nn.Module):
    """y = base(x) + scaling * (x A^T) B^T: the textbook LoRA, nothing else."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def load_model(path: str, device: str, dtype: str) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation="sdpa")
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def add_lora(model: nn.Module, rank: int, alpha: float = spec.LORA_ALPHA) -> list[LoraLinear]:
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS]
    wrapped = []
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoraLinear(linear, rank, alpha)
        setattr(parent, leaf, lora)
        wrapped.append(lora)
    return wrapped


def vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return int(getattr(head, "base", head).weight.shape[0])


class RawBench:
    def __init__(self, model_dir: str, device: str, dtype: str, sizes: spec.Sizes):
        self.sizes, self.device = sizes, torch.device(device)
        self.model = load_model(model_dir, device, dtype)
        self.loras = add_lora(self.model, sizes.rank)
        self.optimizer = torch.optim.AdamW([p for m in self.loras for p in (m.lora_A, m.lora_B)], lr=spec.LR)
        # sampling runs on a second copy, as on a server (trainer and engine hold their own)
        self.sampler = load_model(model_dir, device, dtype)
        self.sampler_loras = add_lora(self.sampler, sizes.rank)
        if vocab_size(self.model) < spec.MAX_TOKEN:
            raise ValueError(f"the benchmark needs a vocabulary of at least {spec.MAX_TOKEN} tokens")
        cfg = self.sampler.generation_config
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    def seconds(self, fn) -> float:
        """Wall time of fn(), device work included (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    # -- training ------------------------------------------------------------------------

    def optim_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)

    def roundtrip(self) -> list[float]:
        tensors = batch_tensors(spec.train_batch(self.sizes, batch=1, seq=self.sizes.rt_tokens), self.device)

        def call(i: int) -> float:
            ms = self.seconds(lambda: lm_loss(self.model, *tensors).backward()) * 1e3
            self.optimizer.zero_grad(set_to_none=False)  # the client's round trips never step
            return ms

        return spec.measure(self.sizes.latency_reps, self.sizes.latency_warmup, call)

    def train(self, batch: int | None = None, seq: int | None = None) -> list[float]:
        rows = spec.train_batch(self.sizes, batch=batch, seq=seq)
        tensors = batch_tensors(rows, self.device)
        tokens = len(rows) * len(rows[0][0])

        def step() -> None:
            lm_loss(self.model, *tensors).backward()
            self.optim_step()

        return spec.measure(self.sizes.reps, self.sizes.warmup, lambda i: tokens / self.seconds(step))

    # -- sampling ------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], num_samples: int, new_tokens: int) -> None:
        """Sample at temperature 1, no top-k/top-p, EOS off: exactly new_tokens per sequence."""
        inputs = torch.tensor(prompt_ids, device=self.device)
        config = GenerationConfig(do_sample=True, temperature=1.0, top_k=None, top_p=None,
                                  max_new_tokens=new_tokens, min_new_tokens=None, eos_token_id=None,
                                  pad_token_id=self.pad_id, num_return_sequences=num_samples)
        with torch.inference_mode():
            out = self.sampler.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                        generation_config=config)
        assert out.shape == (len(prompt_ids) * num_samples, inputs.shape[1] + new_tokens), out.shape

    def sample_throughput(self) -> list[float]:
        s = self.sizes
        prompt_ids = spec.prompts(s)
        tokens = s.sample_prompts * s.sample_n * s.sample_tokens
        return spec.measure(s.reps, s.warmup, lambda i: tokens / self.seconds(
            lambda: self.generate(prompt_ids, s.sample_n, s.sample_tokens)))

    def short_request(self) -> None:
        self.generate(spec.prompts(self.sizes, count=1, seed=2), 1, self.sizes.short_tokens)

    def sample_first_result(self) -> list[float]:
        return spec.measure(self.sizes.latency_reps, self.sizes.latency_warmup,
                            lambda i: self.seconds(self.short_request) * 1e3)

    # -- weight sync ---------------------------------------------------------------------

    def _adapter(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, m in enumerate(self.loras):
            out[f"{i}.lora_A"] = m.lora_A.detach().clone()
            out[f"{i}.lora_B"] = m.lora_B.detach().clone()
        return out

    @torch.no_grad()
    def _load_adapter(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, m in enumerate(self.sampler_loras):
            m.lora_A.copy_(tensors[f"{i}.lora_A"])
            m.lora_B.copy_(tensors[f"{i}.lora_B"])

    def weight_sync(self, named: bool) -> list[float]:
        from safetensors.torch import load_file, save_file

        little = batch_tensors(spec.train_batch(self.sizes, batch=1, seq=self.sizes.rt_tokens), self.device)

        def sync(path: str) -> None:
            tensors = self._adapter()
            if named:
                save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, path)
                tensors = {k: v.to(self.device) for k, v in load_file(path).items()}
            self._load_adapter(tensors)
            self.short_request()

        def run(i: int) -> float:
            lm_loss(self.model, *little).backward()  # new weights each time, as in the tinkerd workload
            self.optim_step()
            return self.seconds(lambda: sync(os.path.join(tmp, f"adapter-{i}.safetensors"))) * 1e3

        with tempfile.TemporaryDirectory(prefix="tinkerd-bench-raw-") as tmp:
            return spec.measure(self.sizes.latency_reps, self.sizes.latency_warmup, run)


def batch_tensors(batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """spec.train_batch rows -> (inputs, targets, weights) tensors [B, T]."""
    inputs = torch.tensor([b[0] for b in batch], device=device)
    targets = torch.tensor([b[1] for b in batch], device=device)
    weights = torch.tensor([b[2] for b in batch], device=device, dtype=torch.float32)
    return inputs, targets, weights


def lm_loss(model: nn.Module, inputs, targets, weights) -> torch.Tensor:
    """Tinker's cross_entropy: -sum(weights * logp(target)), in float32."""
    logits = model(input_ids=inputs, use_cache=False).logits
    logprobs = logits.float().log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return -(weights * logprobs).sum()


def cold_start_child(args) -> None:
    """--cold: report (wall clock) when the model is loaded and when the first result is in."""
    sizes = spec.sizes_from_args(args)
    model = load_model(args.model, args.device, args.dtype)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    ready_at = time.time()
    loras = add_lora(model, sizes.rank)
    optimizer = torch.optim.AdamW([p for m in loras for p in (m.lora_A, m.lora_B)], lr=spec.LR)
    loss = lm_loss(model, *batch_tensors(spec.train_batch(sizes, batch=1, seq=sizes.rt_tokens), args.device))
    loss.backward()
    float(loss)  # waits for the device
    first_result_at = time.time()
    del optimizer
    print(json.dumps({"ready_at": ready_at, "first_result_at": first_result_at}), flush=True)


def cold_start(args, sizes: spec.Sizes, runs: int) -> dict[str, list[float]]:
    """Start `runs` fresh processes (`--cold`); seconds to model loaded, and from there to first result."""
    import subprocess

    cmd = [sys.executable, "-m", "tests.bench.raw", "--cold", "--model", args.model, "--device", args.device,
           "--dtype", args.dtype, *spec.sizes_to_argv(sizes)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    repo_root = Path(__file__).resolve().parents[2]
    launch, first = [], []
    for _ in range(runs):
        t0 = time.time()
        out = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, check=True)
        report = json.loads(out.stdout.strip().splitlines()[-1])
        launch.append(report["ready_at"] - t0)
        first.append(report["first_result_at"] - report["ready_at"])
    return {"cold_launch_s": launch, "cold_first_result_s": first}


def warm_workloads(args, sizes: spec.Sizes) -> dict[str, list[float]]:
    """Every workload but the cold start, on one loaded RawBench (freed on return)."""
    bench = RawBench(args.model, args.device, args.dtype, sizes)
    steps = {"roundtrip_ms": bench.roundtrip, "train_tokens_per_s": bench.train,
             "sample_tokens_per_s": bench.sample_throughput, "sample_first_result_ms": bench.sample_first_result,
             "sync_sampling_client_ms": functools.partial(bench.weight_sync, named=False),
             "sync_named_ms": functools.partial(bench.weight_sync, named=True)}
    for n in sizes.tenant_list:  # the co-batching bound: all n tenants' rows in one step
        steps[spec.tenants_key(n)] = functools.partial(bench.train, batch=n * sizes.tenant_batch,
                                                       seq=sizes.tenant_seq)
    samples = {}
    for key, fn in steps.items():
        if key.split("_", 1)[0] in args.skip:
            continue
        t0 = time.perf_counter()
        samples[key] = fn()
        print(f"raw: {key} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return samples


def run(args) -> dict:
    sizes = spec.sizes_from_args(args)
    samples = warm_workloads(args, sizes)
    if "cold" not in args.skip:
        samples.update(cold_start(args, sizes, sizes.cold_reps))
    return {
        "model": args.model, "device": args.device, "dtype": args.dtype,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "accelerator": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "figures": {key: spec.summarize(values) for key, values in samples.items()},
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory (the one the server serves)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--skip", default="", help=f"comma-separated workloads to skip: {','.join(spec.WORKLOADS)}")
    p.add_argument("--json-out", type=Path, help="write the results here (default: print them)")
    p.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    spec.add_size_args(p)
    args = p.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.cold:
        cold_start_child(args)
        return
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json_out:
        args.json_out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
