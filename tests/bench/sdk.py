"""The workloads as a client sees them: the public tinker SDK only, against any base_url.

Nothing here knows tinkerd: the same code measures any Tinker-compatible server. Every
figure is wall time around SDK calls, from submission to the result in hand.
"""

from __future__ import annotations

import time

import tinker
from tinker import types

from tests.bench import spec


def _datums(rows) -> list[types.Datum]:
    return [types.Datum(model_input=types.ModelInput.from_ints(inputs),
                        loss_fn_inputs={"target_tokens": targets, "weights": weights})
            for inputs, targets, weights in rows]


def train_step(training, data: list[types.Datum], adam: types.AdamParams) -> None:
    """forward_backward + optim_step, both submitted before either result is awaited (Tinker's pipelining)."""
    fwd = training.forward_backward(data, "cross_entropy")
    opt = training.optim_step(adam)
    fwd.result()
    opt.result()


def close_quietly(service) -> None:
    """End the session; older SDKs lack close(), and the server may already be gone."""
    try:
        service.close("success").result()
    except Exception:
        pass


class SdkBench:
    def __init__(self, base_url: str, base_model: str, sizes: spec.Sizes, api_key: str):
        self.sizes, self.base_model = sizes, base_model
        self.service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
        self.training = self.new_training_client()
        self.adam = types.AdamParams(learning_rate=spec.LR)
        self.short_prompt = types.ModelInput.from_ints(spec.prompts(sizes, count=1, seed=2)[0])
        self.short_params = types.SamplingParams(max_tokens=sizes.short_tokens, temperature=1.0, stop=[])
        self.rt_data = _datums(spec.train_batch(sizes, batch=1, seq=sizes.rt_tokens))
        self.sampler = None
        self.notes: dict[str, str] = {}

    def new_training_client(self):
        return self.service.create_lora_training_client(base_model=self.base_model, rank=self.sizes.rank,
                                                        seed=0).result()

    def close(self) -> None:
        close_quietly(self.service)

    # -- 1. round trip -------------------------------------------------------------------

    def roundtrip(self) -> list[float]:
        s = self.sizes

        def call(i: int) -> None:
            self.training.forward_backward(self.rt_data, "cross_entropy").result()

        samples = spec.measure(s.latency_reps, s.latency_warmup, call)
        self.training.optim_step(self.adam).result()  # spend the accumulated gradients
        return samples

    # -- 2. training ---------------------------------------------------------------------

    def train(self) -> list[float]:
        s = self.sizes
        data = _datums(spec.train_batch(s))
        tokens = s.train_batch * s.train_seq

        def step(i: int) -> float:
            t0 = time.perf_counter()
            train_step(self.training, data, self.adam)
            return tokens / (time.perf_counter() - t0)

        return spec.measure(s.reps, s.warmup, step)

    # -- 3. sampling ---------------------------------------------------------------------

    def _sampler(self):
        if self.sampler is None:
            self.sampler = self.training.save_weights_and_get_sampling_client().result()
        return self.sampler

    def sample_throughput(self) -> list[float]:
        s = self.sizes
        sampler = self._sampler()
        prompts = [types.ModelInput.from_ints(p) for p in spec.prompts(s)]
        params = types.SamplingParams(max_tokens=s.sample_tokens, temperature=1.0, stop=[])
        expected = s.sample_prompts * s.sample_n * s.sample_tokens

        def run(i: int) -> float:
            t0 = time.perf_counter()
            futures = [sampler.sample(prompt=p, num_samples=s.sample_n, sampling_params=params) for p in prompts]
            generated = sum(len(seq.tokens) for f in futures for seq in f.result().sequences)
            dt = time.perf_counter() - t0
            if generated != expected:
                self.notes["sample_tokens_per_s"] = (f"the server generated {generated} tokens, not {expected} "
                                                     "(it ignored stop=[]?): tok/s counts what came back")
            return generated / dt

        return spec.measure(s.reps, s.warmup, run)

    def sample_first_result(self) -> list[float]:
        sampler = self._sampler()

        def call(i: int) -> None:
            sampler.sample(prompt=self.short_prompt, num_samples=1, sampling_params=self.short_params).result()

        return spec.measure(self.sizes.latency_reps, self.sizes.latency_warmup, call)

    # -- 4. weight sync ------------------------------------------------------------------

    def _train_a_little(self) -> None:
        self.training.forward_backward(self.rt_data, "cross_entropy").result()
        self.training.optim_step(self.adam).result()

    def weight_sync(self, named: bool) -> list[float]:
        def sync(i: int) -> float:
            self._train_a_little()  # new weights each time
            t0 = time.perf_counter()
            if named:
                path = self.training.save_weights_for_sampler(name=f"bench-sync-{i}").result().path
                sampler = self.service.create_sampling_client(model_path=path).result()
            else:
                sampler = self.training.save_weights_and_get_sampling_client().result()
            sampler.sample(prompt=self.short_prompt, num_samples=1, sampling_params=self.short_params).result()
            return (time.perf_counter() - t0) * 1e3

        return spec.measure(self.sizes.latency_reps, self.sizes.latency_warmup, sync)


# -- 5. cold start: a new model to its first result ----------------------------------------


def create_to_first_result(base_url: str, base_model: str, sizes: spec.Sizes, api_key: str) -> float:
    """Seconds from create_lora_training_client to its first forward_backward result.

    ServiceClient() itself sends nothing: SDK 0.38 sends client/config, dynamic_config and
    create_session on the first call, so they are inside the window (the SDK floor's
    figure has them too, so the overhead above raw + floor leaves them out)."""
    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    data = _datums(spec.train_batch(sizes, batch=1, seq=sizes.rt_tokens))
    try:
        t0 = time.perf_counter()
        training = service.create_lora_training_client(base_model=base_model, rank=sizes.rank, seed=0).result()
        training.forward_backward(data, "cross_entropy").result()
        return time.perf_counter() - t0
    finally:
        close_quietly(service)
