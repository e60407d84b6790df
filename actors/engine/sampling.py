"""Choosing the next token and deciding when a sequence stops.

Token choice, per row of a batch: temperature 0 is greedy (argmax of the raw logits);
otherwise the logits are divided by the temperature, filtered by top-k then top-p
(over the top-k renormalised distribution, as vLLM does), and one token is drawn by
inverse-CDF sampling with that row's own `torch.Generator`. One uniform number per row
per step, drawn from the row's generator, makes a seeded sample reproducible whatever
else shares its batch.

The logprob reported for a chosen token is always the raw one (temperature 1, no
filtering): see `raw_logprobs`. `draw_tokens` serves prompt_alt_tokens_k: k draws per
prompt position at the request's temperature, unfiltered, from their own generator.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

from cluster.messages import SamplingParams

# A byte-level token decodes to at least one byte and a character takes at most four,
# so a stop string of c characters spans at most 4c tokens; the margin covers tokens
# that decode to nothing and decoders that strip a leading space off the first token.
_STOP_WINDOW_MARGIN = 8
# Sample streams have no spawn key, so this one can never coincide with any of theirs.
_PROMPT_ALT_TOKENS_SPAWN_KEY = (1,)


def sample_generator(seed: int | None, sample_index: int) -> torch.Generator:
    """The generator of sample `sample_index` of a request: seeded from (seed, index), or random."""
    return _generator(seed, [sample_index], spawn_key=())


def prompt_alt_tokens_generator(seed: int | None) -> torch.Generator:
    """The generator of a request's prompt_alt_tokens draws: seeded apart from every sample's, or random."""
    return _generator(seed, [], spawn_key=_PROMPT_ALT_TOKENS_SPAWN_KEY)


def _generator(seed: int | None, words: list[int], spawn_key: tuple[int, ...]) -> torch.Generator:
    if seed is None:
        value = secrets.randbits(63)
    else:
        # SeedSequence mixes the words into a well-spread 64-bit seed, the same on every platform
        sequence = np.random.SeedSequence([seed % 2**64, *words], spawn_key=spawn_key)
        value = int(sequence.generate_state(1, np.uint64)[0])
    return torch.Generator(device="cpu").manual_seed(value)


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax of the unscaled, unfiltered logits, in float32.

    This is what the trainer's forward computes for the same tokens with the same
    weights (`logits.float().log_softmax(-1)`), so RL importance ratios between the
    sampler's and the learner's logprobs are exactly 1 when the weights agree, whatever
    temperature/top-k/top-p shaped the choice.
    """
    return logits.float().log_softmax(dim=-1)


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `logits` [B, V]; rows with temperature 0 take the argmax."""
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled_rows:
        return logits.argmax(dim=-1)
    every_row = len(sampled_rows) == len(params)  # the common case: no argmax, no row selection
    index = None if every_row else torch.tensor(sampled_rows, device=logits.device)
    rows = [params[i] for i in sampled_rows]
    scaled = (logits if every_row else logits.index_select(0, index)).float()
    if any(p.temperature != 1.0 for p in rows):  # x / 1.0 == x exactly: skipping it changes nothing
        temperature = torch.tensor([p.temperature for p in rows], device=logits.device, dtype=torch.float32)
        scaled = scaled / temperature.unsqueeze(1)
    uniform = torch.stack([torch.rand((), generator=generators[i]) for i in sampled_rows]).to(logits.device)
    if any(_filters(p) for p in rows):
        order = scaled.argsort(dim=-1, descending=True, stable=True)
        sorted_logits = _top_k_top_p(scaled.gather(1, order), rows)
        chosen = order.gather(1, _inverse_cdf(sorted_logits.softmax(dim=-1), uniform.unsqueeze(1))).squeeze(1)
    else:
        chosen = _inverse_cdf(scaled.softmax(dim=-1), uniform.unsqueeze(1)).squeeze(1)
    if every_row:
        return chosen
    tokens = logits.argmax(dim=-1)
    tokens[index] = chosen
    return tokens


def draw_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
                k: int) -> torch.Tensor:
    """k independent draws (with replacement) per row of `logits` [B, V] at `temperature`: [B, k].

    No top-k / top-p: these are draws from the model's own tempered distribution.
    Temperature 0 is the argmax, k times (no generator needed).
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True).repeat(1, k)
    probs = (logits.float() / temperature).softmax(dim=-1)
    uniform = torch.rand((logits.shape[0], k), generator=generator).to(logits.device)
    return _inverse_cdf(probs, uniform)


def _filters(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1.0


def _top_k_top_p(sorted_logits: torch.Tensor, rows: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) what top-k and then top-p remove; logits sorted descending per row."""
    vocab = sorted_logits.shape[-1]
    device = sorted_logits.device
    rank = torch.arange(vocab, device=device).unsqueeze(0)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in rows], device=device)
    masked = sorted_logits.masked_fill(rank >= top_k.unsqueeze(1), float("-inf"))
    top_p = torch.tensor([p.top_p for p in rows], device=device, dtype=torch.float32)
    probs = masked.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exclusive: the first token is always kept
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    return masked.masked_fill(drop, float("-inf"))


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """For each u of row b of `uniform` [B, m], the index i with cdf[i-1] <= u*total < cdf[i]
    in row b of `probs` [B, V]: always a token of non-zero probability. Returns [B, m]."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # u*total can round up to total itself, which would select past the last real token
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    picked = torch.searchsorted(cdf, target, right=True)
    return picked.clamp(max=probs.shape[-1] - 1)


class StopCondition:
    """When one sequence of a request is done, checked after each token it gains.

    A sequence stops ("stop") at a stop token id, at EOS unless `stop_at_eos` is off,
    or once its generated text contains a stop string; the token that completes the
    stop string (or the stop token itself) is kept. Otherwise it stops at max_tokens
    ("length"). Text is decoded with special tokens kept, so a stop string such as
    "<|im_end|>" matches the special token too.
    """

    def __init__(self, params: SamplingParams, eos_token_ids: set[int], tokenizer):
        self.max_tokens = params.max_tokens
        self.stop_ids = set(params.stop_token_ids) | (eos_token_ids if params.stop_at_eos else set())
        self.stop_strings = [s for s in params.stop_strings if s]
        self.tokenizer = tokenizer
        longest = max((len(s) for s in self.stop_strings), default=0)
        self.window = 4 * longest + _STOP_WINDOW_MARGIN

    def reason(self, tokens: list[int]) -> str | None:
        """"stop", "length" or None (go on), for a sequence whose newest token is tokens[-1]."""
        if tokens[-1] in self.stop_ids or self._ends_in_stop_string(tokens):
            return "stop"
        if len(tokens) >= self.max_tokens:
            return "length"
        return None

    def _ends_in_stop_string(self, tokens: list[int]) -> bool:
        if not self.stop_strings:
            return False
        # earlier windows held no stop string (we would have stopped), so a match here
        # is one the newest token completed
        text = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=False)
        return any(s in text for s in self.stop_strings)
