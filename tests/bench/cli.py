"""tinkerd benchmark suite: one command, tinkerd (started here) or any Tinker-compatible server.

    python -m tests.bench --out bench-out                          # tinkerd, built-in model, CPU
    python -m tests.bench --model-config qwen3-0.6b --device cuda --dtype bfloat16 --out gpu-out
    python -m tests.bench --base-url http://host:8000 --base-model NAME [--model DIR] --out other-out

Workloads (sizes are flags, see below): the throughput figures after --warmup unmeasured
runs, then --reps measured runs; the latency figures (round trip, short request, weight
sync) after --latency-warmup unmeasured calls, then --latency-reps measured calls; the
cold start --cold-reps times:
  1 round trip    one forward_backward on 1 x rt-tokens, submit to result
  2 training      forward_backward + optim_step on train-batch x train-seq, tokens/s
  3 sampling      sample-prompts concurrent requests x sample-n x sample-tokens, generated tokens/s;
                  and one short request (prompt-len tokens, short-tokens new), submit to result
  4 weight sync   save_weights_and_get_sampling_client / save_weights_for_sampler +
                  create_sampling_client, to the short request's result with the new weights
  5 cold start    launch/cluster.py start to healthy; create_lora_training_client to first result
  6 tenants       N client processes at once (each its own session and LoRA), tenant-steps x
                  (forward_backward + optim_step on tenant-batch x tenant-seq) each, aggregate
                  tokens/s, for every N in --tenant-counts (default 1,4,8), on the same server

The raw baseline (tests/bench/raw.py: plain torch + transformers in one process, the
same model, LoRA shape and batches) runs first, before any server is started, and again
once the last server has stopped, so the two never share the CPU; each raw figure pools
both runs' samples, as a small VM's speed drifts while the benchmark runs. Against
--base-url it needs --model (the same model as the server's, a local dir or hub id) or it
is skipped. Every server figure is reported with ratio = server median / raw median.

The SDK floor (tests/bench/floor.py: a stub server that answers every call at once with a
canned result) runs next, also before the server starts, and again after it (before the
second raw run), its figures pooled the same way: the latency workloads' SDK calls (and the
tenants) against it; create_lora_training_client to first result there runs
--latency-warmup + --latency-reps times, as the stub needs no fresh start. Raw compute +
that floor is the best a client can see, so every latency figure is also reported as its
overhead: server - raw - floor (medians, ms). The report marks the issue's targets as
passed or missed.

Writes OUT/bench.json (everything, samples included) and OUT/bench.png (the main
figures), and prints a table. `python -m tests.bench.report OUT/bench.json` prints it again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path

from tests.bench import models, report, spec

REPO_ROOT = Path(__file__).resolve().parents[2]


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_argument_group("what to measure")
    target.add_argument("--base-url", help="a running Tinker-compatible server (default: start tinkerd here)")
    target.add_argument("--base-model", help="the base_model name to ask the server for "
                                             "(default: the one tinkerd serves / the server's first)")
    target.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-bench"))
    target.add_argument("--model", help="model for tinkerd and the raw baseline: a local directory or a hub id "
                                        "(default: tinkerd's built-in model). With --base-url: the server's "
                                        "model, for the raw baseline only")
    target.add_argument("--model-config", help="build a model with random weights from a config: "
                                               f"a preset ({', '.join(models.PRESETS)}) or a config.json path")
    target.add_argument("--device", default="cpu", help="cpu or cuda (tinkerd and the raw baseline)")
    target.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    target.add_argument("--launch-arg", action="append", default=[], metavar="ARG",
                        help="extra flag for launch/cluster.py, repeatable (e.g. --launch-arg=--engines=2)")
    target.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the tinkerd processes, repeatable")
    run = p.add_argument_group("run")
    run.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default bench-out)")
    run.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tinkerd" / "bench",
                     help="where built models are kept between runs")
    run.add_argument("--skip", default="",
                     help=f"comma-separated workloads to skip: {','.join(spec.WORKLOADS)}")
    run.add_argument("--no-raw", action="store_true", help="skip the raw baseline")
    run.add_argument("--no-floor", action="store_true", help="skip the SDK floor (the stub server)")
    run.add_argument("--raw-threads", type=int, default=0, help="torch threads of the raw baseline "
                                                                "(default: torch's choice, all cores)")
    spec.add_size_args(p)
    args = p.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := args.skip - set(spec.WORKLOADS):
        p.error(f"--skip: unknown workloads {sorted(unknown)}")
    if args.model and args.model_config:
        p.error("--model and --model-config are alternatives")
    if args.base_url and args.model_config:
        p.error("--model-config builds a model for tinkerd; with --base-url give --model (the server's model)")
    if args.base_url and args.launch_arg:
        p.error("--launch-arg only applies when the benchmark starts tinkerd")
    check_tenant_counts(p, args)
    return args


def check_tenant_counts(p: argparse.ArgumentParser, args) -> None:
    try:
        counts = spec.sizes_from_args(args).tenant_list
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        p.error(f"--tenant-counts: positive integers, comma-separated (got {args.tenant_counts!r})")
    # each tenant holds one of tinkerd's adapter slots (8 by default); more slots would also
    # change what every other figure measures, so it is the caller's choice, not made here
    if (not args.base_url and "tenants" not in args.skip and max(counts) > 8
            and not any(a == "--max-adapters" or a.startswith("--max-adapters=") for a in args.launch_arg)):
        p.error(f"--tenant-counts up to {max(counts)} needs as many adapter slots: "
                f"add --launch-arg=--max-adapters={max(counts)}")


def run_raw(args, model: str, sizes: spec.Sizes) -> dict:
    with tempfile.TemporaryDirectory(prefix="tinkerd-bench-raw-") as tmp:
        out = Path(tmp) / "raw.json"
        cmd = [sys.executable, "-m", "tests.bench.raw", "--model", model, "--device", args.device,
               "--dtype", args.dtype, "--json-out", str(out), *spec.sizes_to_argv(sizes)]
        if args.skip:
            cmd += ["--skip", ",".join(sorted(args.skip))]
        if args.raw_threads:
            cmd += ["--threads", str(args.raw_threads)]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the raw baseline failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


FLOOR_MODEL = "tinkerd-bench/floor"  # the stub serves any name


class Runner:
    """Runs the SDK workloads and collects samples, notes and errors (the server's and the SDK floor's)."""

    def __init__(self, args, sizes: spec.Sizes):
        self.args, self.sizes = args, sizes
        self.samples: dict[str, list[float]] = {}
        self.floor: dict[str, list[float]] = {}
        self.notes: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.floor_runs = 0

    def attempt(self, key: str | None, fn, into: dict | None = None, name: str | None = None) -> None:
        """into[key] = fn() (into: the server's samples by default); with key None, fn returns {key: samples}."""
        into = self.samples if into is None else into
        name = name or key
        t0 = time.perf_counter()
        try:
            value = fn()
            into.update(value if key is None else {key: value})
            log(f"{name}: done in {time.perf_counter() - t0:.1f} s")
        except Exception as exc:  # a server that lacks a feature still gets the other figures
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            log(f"{name} FAILED: {self.errors[name]}\n{traceback.format_exc()}")

    def steps(self, bench, latency_only: bool = False) -> list[tuple[str, object]]:
        """(figure key, what measures it) for the workloads not skipped."""
        steps = [("roundtrip_ms", bench.roundtrip), ("train_tokens_per_s", bench.train),
                 ("sample_tokens_per_s", bench.sample_throughput),
                 ("sample_first_result_ms", bench.sample_first_result),
                 ("sync_sampling_client_ms", lambda: bench.weight_sync(named=False)),
                 ("sync_named_ms", lambda: bench.weight_sync(named=True))]
        return [(key, fn) for key, fn in steps if spec.FIGURES_BY_KEY[key].workload_id not in self.args.skip
                and (key in spec.LATENCY_KEYS or not latency_only)]

    def server_workloads(self, base_url: str, base_model: str) -> None:
        from tests.bench.sdk import SdkBench

        bench = SdkBench(base_url, base_model, self.sizes, self.args.api_key)
        try:
            for key, fn in self.steps(bench):
                self.attempt(key, fn)
            self.notes.update(bench.notes)
        finally:
            bench.close()  # frees its adapter slot before the tenants take theirs
        self.tenants(base_url, base_model, self.samples)

    def tenants(self, base_url: str, base_model: str, into: dict, name: str = "tenants") -> None:
        from tests.bench import tenants

        if "tenants" in self.args.skip:
            return

        def measure() -> dict[str, list[float]]:
            samples, note = tenants.measure(base_url, base_model, self.sizes, self.args.api_key)
            if into is self.samples:
                self.notes[spec.tenants_key(max(self.sizes.tenant_list))] = note
            return samples

        self.attempt(None, measure, into, name)

    def floor_workloads(self, when: str) -> None:
        """The latency workloads (and the tenants) against the SDK floor, a stub that answers at once; each
        run's samples are added to those of the runs before it (see `pooled`)."""
        from tests.bench import floor

        log(f"SDK floor {when} ...")
        try:
            stub = floor.start()
        except Exception as exc:  # the server's own figures do not need it
            error = self.errors[f"floor {when}"] = f"{type(exc).__name__}: {exc}"
            log(f"the SDK floor stub FAILED to start: {error}")
            return
        log(f"SDK floor stub at {stub.base_url}")
        run: dict[str, list[float]] = {}
        try:
            self.attempt(None, lambda: self.floor_latency(stub.base_url), run, f"floor latency {when}")
            self.tenants(stub.base_url, FLOOR_MODEL, run, f"floor tenants {when}")
        finally:
            stub.stop()
        for key, samples in run.items():
            self.floor.setdefault(key, []).extend(samples)
        self.floor_runs += 1

    def floor_latency(self, base_url: str) -> dict[str, list[float]]:
        from tests.bench.sdk import SdkBench, create_to_first_result

        s = self.sizes
        bench = SdkBench(base_url, FLOOR_MODEL, s, self.args.api_key)
        try:
            samples = {key: fn() for key, fn in self.steps(bench, latency_only=True)}
        finally:
            bench.close()
        if "cold" not in self.args.skip:
            samples["cold_first_result_s"] = [create_to_first_result(base_url, FLOOR_MODEL, s, self.args.api_key)
                                              for _ in range(s.latency_warmup + s.latency_reps)][s.latency_warmup:]
        return samples


def default_base_model(base_url: str, api_key: str) -> str:
    import tinker

    from tests.bench.sdk import close_quietly

    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    try:
        supported = service.get_server_capabilities().supported_models
    finally:
        close_quietly(service)
    if not supported:
        raise RuntimeError(f"{base_url} lists no supported models; pass --base-model")
    return supported[0].model_name


def bench_external(args, sizes: spec.Sizes, runner: Runner) -> dict:
    from tests.bench.sdk import create_to_first_result

    base_model = args.base_model or default_base_model(args.base_url, args.api_key)
    log(f"server {args.base_url}, base_model {base_model}")
    runner.server_workloads(args.base_url, base_model)
    if "cold" not in args.skip:
        runner.notes["cold_launch_s"] = "not measured: the benchmark did not start this server"
        runner.notes["cold_first_result_s"] = "measured on the running server, not a freshly started one"
        runner.attempt("cold_first_result_s", lambda: [
            create_to_first_result(args.base_url, base_model, sizes, args.api_key)
            for _ in range(sizes.warmup + sizes.cold_reps)][sizes.warmup:])
    return {"kind": "external", "base_url": args.base_url, "base_model": base_model,
            "device": args.device if args.model else None, "dtype": args.dtype if args.model else None}


def bench_tinkerd(args, sizes: spec.Sizes, runner: Runner, launch_model: str | None,
                  models_dir: Path) -> dict:
    from tests.bench import server
    from tests.bench.sdk import create_to_first_result

    launch = server.LaunchSpec(models_dir=models_dir, model=launch_model, device=args.device, dtype=args.dtype,
                               extra_args=tuple(args.launch_arg),
                               env=tuple(tuple(kv.split("=", 1)) for kv in args.server_env))
    log("starting tinkerd ...")
    cluster = server.start(launch)
    log(f"tinkerd ready in {cluster.launch_s:.1f} s at {cluster.base_url}, model {cluster.model_name}")
    base_model = args.base_model or cluster.model_name
    try:
        runner.server_workloads(cluster.base_url, base_model)
    finally:
        cluster.stop()
        server.remove_state(cluster)
    if "cold" not in args.skip:
        # the first start (above) warmed the page cache: it is the warm-up, not a sample
        launch_s, first_s = [], []

        def cycle() -> None:
            fresh = server.start(launch)
            try:
                launch_s.append(fresh.launch_s)
                first_s.append(create_to_first_result(fresh.base_url, base_model, sizes, args.api_key))
            finally:
                fresh.stop()
                server.remove_state(fresh)
            log(f"cold start: ready in {launch_s[-1]:.1f} s, first result {first_s[-1]:.2f} s later")

        def cycles() -> list[float]:
            for _ in range(sizes.cold_reps):
                cycle()
            return launch_s

        runner.attempt("cold_launch_s", cycles)
        if first_s:
            runner.samples["cold_first_result_s"] = first_s
        runner.notes.setdefault("cold_launch_s", f"after one unmeasured start (the one the other workloads ran on: "
                                                 f"{cluster.launch_s:.1f} s)")
    return {"kind": "tinkerd", "base_url": None, "base_model": base_model, "device": args.device,
            "dtype": args.dtype, "model": launch_model or "built-in", "launch_args": args.launch_arg,
            "server_env": args.server_env}


def choose_models(args) -> tuple[str | None, str | None, dict | None]:
    """(model for tinkerd's launcher, None = built-in; model for the raw baseline; built model's summary)."""
    if args.base_url or (args.model and not args.model_config):
        return args.model, args.model, None
    log("preparing the model ...")
    info = models.prepare(args.cache_dir, args.model_config, args.dtype)
    return (info["path"] if args.model_config else None), info["path"], info


def raw_baseline(args, raw_model: str | None, sizes: spec.Sizes, when: str) -> tuple[dict | None, str | None]:
    """(the raw baseline's results, or None and why it was skipped)."""
    if args.no_raw:
        return None, "--no-raw"
    if raw_model is None:
        return None, "--base-url without --model: the raw baseline needs the server's model on this machine"
    log(f"raw baseline {when} on {raw_model} ({args.device}, {args.dtype}) ...")
    t0 = time.perf_counter()
    result = run_raw(args, raw_model, sizes)
    log(f"raw baseline done in {time.perf_counter() - t0:.1f} s")
    return result, None


def pooled(before: dict | None, after: dict | None) -> dict | None:
    """One raw result from the runs before and after the server: each figure's samples of both together.
    A small VM's speed drifts (2x within an hour, measured), so a baseline taken only before the server
    would skew every ratio by however much the machine changed meanwhile."""
    if before is None or after is None:
        return before
    figures = {key: spec.summarize(stats["samples"] + after["figures"][key]["samples"])
               for key, stats in before["figures"].items()}
    return {**before, "figures": figures, "runs": 2}


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = spec.sizes_from_args(args)
    started = datetime.now().astimezone()
    # other processes' load skews every figure on a small machine: note it, do not hide it
    load = {"busy_before_start": report.cpu_busy(), "start": [round(x, 2) for x in os.getloadavg()]}
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    launch_model, raw_model, model_info = choose_models(args)
    raw_result, raw_skipped = raw_baseline(args, raw_model, sizes, "before the server")
    runner = Runner(args, sizes)
    floor_skipped = "--no-floor" if args.no_floor else None
    if not args.no_floor:
        runner.floor_workloads("before the server")
    if args.base_url:
        target = bench_external(args, sizes, runner)
    else:
        target = bench_tinkerd(args, sizes, runner, launch_model, args.cache_dir / "models")
    if model_info:
        target["model_info"] = model_info
    if not args.no_floor:
        runner.floor_workloads("after the server")
    if raw_result is not None:
        raw_result = pooled(raw_result, raw_baseline(args, raw_model, sizes, "after the server")[0])
    load["end"] = [round(x, 2) for x in os.getloadavg()]
    result = report.build(target=target, sizes=sizes, server=runner.samples, raw_result=raw_result,
                          raw_skipped=raw_skipped, floor=runner.floor, floor_skipped=floor_skipped,
                          floor_runs=runner.floor_runs, notes=runner.notes, started=started, loadavg=load)
    result["errors"] = runner.errors
    json_path, png_path, png_problem = report.write(result, args.out)
    print(report.table(result))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else f" ({png_problem})"))
    if runner.errors:
        print(f"FAILED workloads: {', '.join(runner.errors)}", file=sys.stderr)
        return 1
    return 0
