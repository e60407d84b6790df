"""What every workload does, shared by the tinkerd side (tinker SDK) and the raw baseline.

Both sides build their inputs from the same `Sizes` and the same seeded generator, so
they do exactly the same work: the same token ids, the same batch shapes, the same
LoRA shape. Token ids are drawn from [FIRST_TOKEN, MAX_TOKEN): real ids of any model
with a vocabulary of at least 900 (the built-in one has 909), past its special tokens.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

FIRST_TOKEN = 3
MAX_TOKEN = 900
LORA_ALPHA = 32.0  # tinkerd's default (the SDK sends none)
LR = 1e-4


@dataclass
class Sizes:
    rank: int = 32  # LoRA rank of every training client (attn + mlp + unembed, the SDK default)
    # 1. round trip
    rt_tokens: int = 8
    # 2. training throughput
    train_batch: int = 32
    train_seq: int = 256
    # 3. sampling throughput
    sample_prompts: int = 16
    sample_n: int = 4
    sample_tokens: int = 64
    prompt_len: int = 16
    # 3b / 4. the short request: one prompt, one sample, this many new tokens
    short_tokens: int = 1
    # repetitions
    warmup: int = 1  # unmeasured runs of each throughput workload first
    # continuous batching makes a sampling run's batches differ from run to run: 3 runs
    # gave medians that moved by a quarter between identical runs on a 2-core VM
    reps: int = 5  # measured runs of training and sampling throughput
    latency_warmup: int = 3
    latency_reps: int = 20  # measured calls of the round trip, the short sample and each weight sync
    cold_reps: int = 3  # fresh starts (each takes seconds; the first start is the warm-up)
    # 6. tenants: N client processes at once, each its own session and LoRA; per run each
    # does tenant_steps steps of forward_backward + optim_step on tenant_batch x tenant_seq
    tenant_batch: int = 4
    tenant_seq: int = 32
    tenant_steps: int = 4
    tenant_counts: str = "1,4,8"  # the N measured, comma-separated; the scaling ratios are against N=1

    @property
    def tenant_list(self) -> list[int]:
        return sorted({int(n) for n in self.tenant_counts.split(",") if n.strip()})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def token_ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(FIRST_TOKEN, MAX_TOKEN, n).tolist()


def train_batch(sizes: Sizes, batch: int | None = None, seq: int | None = None,
                seed: int = 0) -> list[tuple[list[int], list[int], list[float]]]:
    """(input tokens, target tokens, weights) per sequence: next-token SFT on random ids."""
    rng = np.random.default_rng(seed)
    batch = sizes.train_batch if batch is None else batch
    seq = sizes.train_seq if seq is None else seq
    out = []
    for _ in range(batch):
        ids = token_ids(rng, seq + 1)
        out.append((ids[:-1], ids[1:], [1.0] * seq))
    return out


def prompts(sizes: Sizes, count: int | None = None, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [token_ids(rng, sizes.prompt_len) for _ in range(sizes.sample_prompts if count is None else count)]


def measure(runs: int, warmup: int, fn: Callable[[int], float | None]) -> list[float]:
    """Call fn(i) warmup + runs times and keep the last `runs` figures. fn returns its own
    figure, or None to be timed here in ms (a caller that must sync a device times itself)."""
    samples = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        value = fn(i)
        if value is None:
            value = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            samples.append(value)
    return samples


def summarize(samples: list[float]) -> dict:
    """Median, min, max (and the samples) of a figure's measurements."""
    if not samples:
        return {"median": None, "min": None, "max": None, "n": 0, "samples": []}
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples),
            "samples": [round(s, 6) for s in samples]}


# workload id (the first word of its figures' keys, what --skip names) -> its title
WORKLOADS = {"roundtrip": "1 round trip", "train": "2 training", "sample": "3 sampling",
             "sync": "4 weight sync", "cold": "5 cold start", "tenants": "6 tenants"}
# the latency figures, also measured against the SDK floor (tests/bench/floor.py)
LATENCY_KEYS = ("roundtrip_ms", "sample_first_result_ms", "sync_sampling_client_ms", "sync_named_ms",
                "cold_first_result_s")
FLOOR_WHAT = ("the same SDK calls against a stub server that answers at once with canned results "
              "(tests/bench/floor.py): SDK, HTTP and loopback only")
# a figure key's ending -> (unit, which way is better); the first match wins
_UNITS = (("_per_s", "tok/s", "higher"), ("_ms", "ms", "lower"), ("_s", "s", "lower"))


@dataclass(frozen=True)
class Figure:
    key: str  # "<workload id>_..._<unit ending>": the key alone says workload and unit
    what: str  # what tinkerd's figure measures
    raw_what: str  # what the raw baseline's figure measures

    @property
    def workload_id(self) -> str:
        return self.key.split("_", 1)[0]

    @property
    def workload(self) -> str:
        return WORKLOADS[self.workload_id]

    @property
    def unit(self) -> str:
        return next(unit for ending, unit, _ in _UNITS if self.key.endswith(ending))

    @property
    def better(self) -> str:
        return next(better for ending, _, better in _UNITS if self.key.endswith(ending))


# key: (what tinkerd's figure measures, what the raw baseline's figure measures)
_FIGURE_TEXTS = {
    "roundtrip_ms": ("forward_backward, 1 sequence x rt_tokens, submit to result (SDK futures)",
                     "forward + backward of the same sequence, in process"),
    "train_tokens_per_s": ("forward_backward + optim_step on train_batch x train_seq, both results back",
                           "forward + backward + AdamW step on the same batch"),
    "sample_tokens_per_s": ("sample_prompts concurrent sample() calls x sample_n x sample_tokens new tokens "
                            "(EOS off)",
                            "one generate() (KV cache) with num_return_sequences=sample_n, same prompts and "
                            "lengths"),
    "sample_first_result_ms": ("one sample(): prompt_len-token prompt, 1 sample, short_tokens new tokens, "
                               "submit to result",
                               "generate() of the same request"),
    "sync_sampling_client_ms": ("save_weights_and_get_sampling_client, then the short request with the new "
                                "weights, to its result",
                                "copy the adapter tensors into a sampler model, then generate() the short request"),
    "sync_named_ms": ("save_weights_for_sampler(name) + create_sampling_client(path), then the short request, "
                      "to its result",
                      "save the adapter as safetensors, load it into the sampler model, generate() the short "
                      "request"),
    "cold_launch_s": ("python -m launch.cluster started to healthy (ready line)",
                      "a fresh python process: import torch + transformers, load the model"),
    "cold_first_result_s": ("create_lora_training_client to the first forward_backward (rt_tokens) result, "
                            "on a fresh server",
                            "add LoRA + AdamW, first forward + backward, in that fresh process"),
}
FIGURES = [Figure(key, what, raw_what) for key, (what, raw_what) in _FIGURE_TEXTS.items()]
FIGURES_BY_KEY = {f.key: f for f in FIGURES}


def tenants_key(n: int) -> str:
    return f"tenants_{n}_tokens_per_s"


def figures(sizes: Sizes) -> list[Figure]:
    """Every figure of a run: the fixed ones, then one per tenant count."""
    return FIGURES + [Figure(tenants_key(n),
                             f"{n} client process(es) at once, each its own session and LoRA, tenant_steps x "
                             "(forward_backward + optim_step on tenant_batch x tenant_seq); aggregate tokens/s "
                             "from the common start signal to the last result",
                             f"one forward + backward + AdamW step on the {n} tenants' batches as one batch "
                             f"({n} x tenant_batch rows), one adapter: the co-batching bound (one optimizer "
                             "step, not one per tenant)")
                      for n in sizes.tenant_list]


@dataclass(frozen=True)
class Target:
    """A goal of issue 12, checked in every report."""

    key: str  # the figure it is about
    measure: str  # "overhead_ms" (above raw + SDK floor), "ratio" (to raw) or "scaling" (to 1 tenant)
    op: str  # "<=" or ">="
    threshold: float
    text: str

    def passes(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value <= self.threshold if self.op == "<=" else value >= self.threshold


TARGETS = (
    Target("roundtrip_ms", "overhead_ms", "<=", 3.0, "round trip <= 3 ms above raw + SDK floor"),
    Target("sample_first_result_ms", "overhead_ms", "<=", 3.0, "short sample <= 3 ms above raw + SDK floor"),
    Target("sync_sampling_client_ms", "overhead_ms", "<=", 3.0,
           "weight sync (save_weights_and_get_sampling_client) <= 3 ms above raw + SDK floor"),
    Target("sync_named_ms", "overhead_ms", "<=", 3.0, "weight sync (named) <= 3 ms above raw + SDK floor"),
    Target("sample_tokens_per_s", "ratio", ">=", 1.2, "sampling throughput >= 1.2x raw generate"),
    Target("train_tokens_per_s", "ratio", ">=", 1.0, "training throughput >= 1.0x raw"),
    Target("cold_launch_s", "ratio", "<=", 1.3, "cold launch <= 1.3x raw"),
    Target(tenants_key(8), "scaling", ">=", 3.0, "8 tenants aggregate >= 3x one tenant"),
)


def add_size_args(parser) -> None:
    """One flag per `Sizes` field (`--train-batch 32`, ...), defaults from `Sizes`."""
    group = parser.add_argument_group("workload sizes")
    for field in dataclasses.fields(Sizes):
        kind = type(field.default)
        group.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default,
                           dest=field.name, metavar="N" if kind is int else "LIST", help=f"default {field.default}")


def sizes_from_args(args) -> Sizes:
    return Sizes(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Sizes)})


def sizes_to_argv(sizes: Sizes) -> list[str]:
    argv = []
    for name, value in sizes.as_dict().items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv
