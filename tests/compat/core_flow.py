"""The core flow with whatever tinker SDK is installed: runs INSIDE an old-SDK venv.

    python core_flow.py BASE_URL MODEL_NAME [--step-timeout S] [--extras]

Creates a rank-8 LoRA training client (seed 0), runs three forward_backward(cross_entropy) +
optim_step rounds on two datums made from raw token ids (no tokenizer, so no hub),
saves the weights for a sampler, samples 2 sequences of at most 8 tokens and, where
the SDK has it, calls compute_logprobs. It prints ONE JSON line on stdout (SDK logs
go to stderr):

    {"sdk_version": "0.16.1", "steps": {"create": "ok", "fwd_bwd": "ok", ...},
     "losses": [...], "num_samples": 2, "sample_lengths": [8, 8], "logprobs_len": 6,
     "extras": {...}, "errors": {"sample": "NotFoundError: ..."}, "seconds": {...}}

Each step is "ok", "error", "skipped" (an earlier step failed) or "n/a" (the SDK has
no such call). With --extras it then tries, independently of each other, calls beyond
the core flow that every one of these SDKs has (get_info, a named sampler snapshot
sampled through create_sampling_client(model_path=...), a base-model sampling client,
save_state + load_state, forward) and reports them under "extras" the same way.
Only APIs present in every SDK from 0.6.3 to 0.38.0 are used; this file must stay
importable by all of them (standard library + tinker only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import traceback

import tinker
from tinker import types

API_KEY = "tml-compat"
STEPS = ("create", "fwd_bwd", "optim", "save_for_sampler", "sample", "compute_logprobs")
EXTRAS = ("get_info", "save_named_for_sampler", "sample_from_path", "sample_from_base_model",
          "save_state", "load_state", "forward")
# two tiny datums from raw token ids: model_input = seq[:-1], targets = seq[1:]
SEQUENCES = ([11, 12, 13, 14, 15, 16, 17], [21, 22, 23, 24, 25, 26, 27, 28])
PROMPT = [11, 12, 13, 14, 15, 16]
ROUNDS = 3
SEED = 0  # LoRA init: with it every SDK version must see the same losses
LEARNING_RATE = 5e-3

report: dict = {"sdk_version": getattr(tinker, "__version__", "unknown"),
                "steps": {step: "skipped" for step in STEPS},
                "losses": [], "num_samples": 0, "sample_lengths": [], "logprobs_len": None,
                "extras": {}, "errors": {}, "seconds": {}}
_printed = threading.Lock()


def emit_and_exit(code: int) -> None:
    """Print the report once and leave at once: old SDKs keep non-daemon threads alive."""
    if _printed.acquire(blocking=False):
        sys.stdout.write(json.dumps(report) + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def resolve(value):
    """0.38 returns futures of clients (`.result()`); earlier SDKs return the client itself."""
    result = getattr(value, "result", None)
    return result() if callable(result) else value


def run_step(name: str, timeout_s: float, fn, table: str = "steps"):
    """Run one step under a watchdog; a failure is recorded and raised."""
    def on_timeout() -> None:
        report[table][name] = "error"
        report["errors"][name] = f"timed out after {timeout_s:.0f} s"
        emit_and_exit(3)

    watchdog = threading.Timer(timeout_s, on_timeout)
    watchdog.daemon = True
    watchdog.start()
    start = time.monotonic()
    try:
        value = fn()
    except Exception as exc:
        report[table][name] = "error"
        message = f"{type(exc).__name__}: {exc}"
        report["errors"][name] = message[:1500]
        sys.stderr.write(f"[core_flow] step {name} failed:\n{traceback.format_exc()}\n")
        raise
    finally:
        watchdog.cancel()
        # summed over the rounds for fwd_bwd and optim
        report["seconds"][name] = round(report["seconds"].get(name, 0.0) + time.monotonic() - start, 2)
    report[table][name] = "ok"
    return value


def run_extra(name: str, timeout_s: float, fn):
    """An extra call: its failure is recorded and does not end the run."""
    try:
        return run_step(name, timeout_s, fn, table="extras")
    except Exception:
        return None


def datum(seq: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                       loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * (len(seq) - 1)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("model")
    parser.add_argument("--step-timeout", type=float, default=60.0)
    parser.add_argument("--extras", action="store_true", help="also try calls beyond the core flow")
    args = parser.parse_args()
    t = args.step_timeout

    service = tinker.ServiceClient(base_url=args.base_url, api_key=API_KEY)
    training = run_step("create", t, lambda: resolve(service.create_lora_training_client(base_model=args.model,
                                                                                         rank=8, seed=SEED)))
    data = [datum(seq) for seq in SEQUENCES]

    def train_round() -> tuple:
        # submitted back to back, as the docs recommend, then awaited
        fwd = training.forward_backward(data, "cross_entropy")
        opt = training.optim_step(types.AdamParams(learning_rate=LEARNING_RATE))
        return fwd, opt

    for _ in range(ROUNDS):
        fwd, opt = train_round()
        out = run_step("fwd_bwd", t, lambda: fwd.result())
        loss = float(out.metrics["loss:sum"])
        report["losses"].append(loss)
        if not math.isfinite(loss):
            report["steps"]["fwd_bwd"] = "error"
            report["errors"]["fwd_bwd"] = f"loss:sum is not finite: {loss}"
            emit_and_exit(1)
        run_step("optim", t, lambda: opt.result())

    sampler = run_step("save_for_sampler", t, lambda: resolve(training.save_weights_and_get_sampling_client()))
    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=1234)
    response = run_step("sample", t, lambda: sampler.sample(prompt=prompt, num_samples=2,
                                                            sampling_params=params).result())
    report["num_samples"] = len(response.sequences)
    report["sample_lengths"] = [len(seq.tokens) for seq in response.sequences]

    if hasattr(sampler, "compute_logprobs"):
        logprobs = run_step("compute_logprobs", t, lambda: sampler.compute_logprobs(prompt).result())
        report["logprobs_len"] = len(logprobs)
    else:
        report["steps"]["compute_logprobs"] = "n/a"

    if args.extras:
        run_extras(service, training, data, args.model, prompt, params, t)

    if hasattr(service, "close"):  # 0.30+; a failure here is not part of the flow
        try:
            service.close("success").result(timeout=10)
        except Exception as exc:
            report["errors"]["close"] = f"{type(exc).__name__}: {exc}"[:500]
    emit_and_exit(0)


def run_extras(service, training, data, model, prompt, params, t) -> None:
    for name in EXTRAS:
        report["extras"][name] = "skipped"
    run_extra("get_info", t, lambda: training.get_info())

    name = "compat-" + report["sdk_version"].replace(".", "-")
    saved = run_extra("save_named_for_sampler", t, lambda: training.save_weights_for_sampler(name).result())
    if saved is not None:
        run_extra("sample_from_path", t, lambda: resolve(service.create_sampling_client(model_path=saved.path))
                  .sample(prompt=prompt, num_samples=1, sampling_params=params).result())
    run_extra("sample_from_base_model", t, lambda: resolve(service.create_sampling_client(base_model=model))
              .sample(prompt=prompt, num_samples=1, sampling_params=params).result())

    state = run_extra("save_state", t, lambda: training.save_state(name).result())
    if state is not None:
        run_extra("load_state", t, lambda: training.load_state(state.path).result())
    # last: a sequenced request the server rejects leaves a gap in the model's seq_ids,
    # and nothing sequenced after it would ever run
    run_extra("forward", t, lambda: float(training.forward(data, "cross_entropy").result().metrics["loss:sum"]))


if __name__ == "__main__":
    try:
        main()
    except Exception:
        emit_and_exit(1)
