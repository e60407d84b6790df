"""stable_reinforce's records: what a sample with record_stability_info keeps, and every rule a
training datum must meet to use them (each broken rule is a 400 naming datum, span and rule)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from actors.controller.errors import ApiError
from actors.controller.stability import RECORD_TTL_S, StabilityRecords
from actors.controller.store import StateStore
from cluster.loss_specs import SAMPLED_MASK
from cluster.messages import (
    DatumBatch, DatumProvenance, ForwardBackwardReq, ProvenanceSpan, SampledSequence, SampleReq, SampleResult,
    SamplingParams,
)

SESSION, USER = "sess", "alice"
PROMPT = [11, 12, 13, 14]
SAMPLED = [[21, 22, 23], [31, 32]]
SAMPLER_LOGPROBS = [[-0.5, -1.5, -2.5], [-0.25, -0.75]]
IDS = ["sess:sample:0:0:0", "sess:sample:0:0:1"]


@pytest.fixture
def records(tmp_path) -> StabilityRecords:
    records = StabilityRecords(StateStore(tmp_path / "db.sqlite3"))
    req = SampleReq(sampling_session_id="sess:sample:0", seq_id=0, prompt_tokens=np.array(PROMPT), num_samples=2,
                    params=SamplingParams(max_tokens=3, temperature=0.9, seed=4), record_stability_info=True)
    result = SampleResult(sequences=[SampledSequence(tokens=np.array(t, np.int32),
                                                     logprobs=np.array(lp, np.float32), stop_reason="length")
                                     for t, lp in zip(SAMPLED, SAMPLER_LOGPROBS)])
    records.record(SESSION, USER, "sess:sample:0", "run@3", req, IDS, result)
    return records


def _prompt(offset: int, length: int, sequence_id: str = IDS[0]) -> ProvenanceSpan:
    return ProvenanceSpan(sequence_id=sequence_id, sampled=False, offset=offset, length=length)


def _sampled(offset: int, length: int, sequence_id: str = IDS[0]) -> ProvenanceSpan:
    return ProvenanceSpan(sequence_id=sequence_id, sampled=True, offset=offset, length=length)


def _rl_datum(k: int, advantage: float):
    """The cookbook's datum for sequence k: prompt + sampled[:-1] in, zeros + sampled as targets."""
    sampled, n = SAMPLED[k], len(SAMPLED[k])
    tokens = PROMPT + sampled[:-1]
    targets = [0] * (len(PROMPT) - 1) + sampled
    advantages = [0.0] * (len(PROMPT) - 1) + [advantage] * n
    spans = DatumProvenance(model_input=[_prompt(0, len(PROMPT), IDS[k]), _sampled(0, n - 1, IDS[k])],
                            targets=[_prompt(1, len(PROMPT) - 1, IDS[k]), _sampled(0, n, IDS[k])])
    return tokens, targets, advantages, spans


def _request(*datums) -> ForwardBackwardReq:
    tokens, targets, advantages, spans = zip(*datums)
    cat = lambda rows, dtype: np.concatenate([np.asarray(r, dtype) for r in rows])  # noqa: E731
    batch = DatumBatch(tokens=cat(tokens, np.int64), lengths=np.array([len(t) for t in tokens]),
                       loss_inputs={"target_tokens": cat(targets, np.int64), "advantages": cat(advantages, np.float32),
                                    "logprobs": np.full(sum(map(len, tokens)), -42.0, np.float32)})
    return ForwardBackwardReq(model_id="sess:train:0", seq_id=1, loss_fn="stable_reinforce", batch=batch,
                              provenance=list(spans))


def test_training_uses_the_recorded_logprobs_not_the_clients(records):
    batch = records.training_batch(SESSION, USER, _request(_rl_datum(0, 1.0), _rl_datum(1, -1.0)))
    pad = [0.0] * (len(PROMPT) - 1)
    np.testing.assert_array_equal(batch.loss_inputs["logprobs"],
                                  np.array(pad + SAMPLER_LOGPROBS[0] + pad + SAMPLER_LOGPROBS[1], np.float32))
    assert batch.loss_inputs[SAMPLED_MASK].tolist() == pad + [1.0] * 3 + pad + [1.0] * 2


def test_the_record_keeps_prompt_tokens_logprobs_adapter_and_params(records):
    row = records.store.sampled_sequences(IDS[:1], used_after=0)[IDS[0]]
    assert (row["session_id"], row["user"], row["adapter_id"]) == (SESSION, USER, "run@3")
    assert np.frombuffer(row["prompt_tokens"], "<i4").tolist() == PROMPT
    assert np.frombuffer(row["tokens"], "<i4").tolist() == SAMPLED[0]
    assert np.frombuffer(row["logprobs"], "<f4").tolist() == SAMPLER_LOGPROBS[0]
    assert '"temperature": 0.9' in row["params"] and '"seed": 4' in row["params"]


def _broken(datum_changes) -> tuple:
    tokens, targets, advantages, spans = (list(x) if isinstance(x, list) else x for x in _rl_datum(0, 1.0))
    return datum_changes(tokens, targets, advantages, spans) or (tokens, targets, advantages, spans)


def _rename(spans: DatumProvenance, sequence_id: str) -> DatumProvenance:
    rename = lambda s: ProvenanceSpan(sequence_id=sequence_id, sampled=s.sampled, offset=s.offset,  # noqa: E731
                                      length=s.length)
    return DatumProvenance(model_input=[rename(s) for s in spans.model_input],
                           targets=[rename(s) for s in spans.targets])


def _set(values: list, index: int, value) -> None:
    values[index] = value


@pytest.mark.parametrize("change, words", [
    (lambda t, g, a, s: (t, g, a, _rename(s, "sess:sample:0:0:9")),
     ["data[0].model_input_spans[0]", "names no sample recorded"]),
    (lambda t, g, a, s: _set(t, 1, 99),
     ["data[0].model_input_spans[0]", "model_input[0:4] differs from the recorded prompt"]),
    (lambda t, g, a, s: _set(t, 5, 99), ["model_input_spans[1]", "model_input[4:6]", "recorded sampled tokens"]),
    (lambda t, g, a, s: _set(g, 4, 99), ["data[0].loss_fn_input_spans[1]", "target_tokens[3:6] differ"]),
    (lambda t, g, a, s: _set(a, 0, 0.5), ["advantages", "position 0", "must be 0 on prompt-span targets"]),
    (lambda t, g, a, s: (t, g, a, DatumProvenance(model_input=s.model_input, targets=[_prompt(2, 3), _sampled(0, 3)])),
     ["data[0].loss_fn_input_spans[0]", "offset 2, length 3", "runs past the end of the recorded prompt (4 tokens)"]),
])
def test_a_datum_that_does_not_reproduce_its_records_is_400(records, change, words):
    with pytest.raises(ApiError) as err:
        records.training_batch(SESSION, USER, _request(_rl_datum(1, 1.0), _broken(change)))
    assert err.value.status == 400
    for word in ["data[1]"] + [w.replace("data[0]", "data[1]") for w in words]:
        assert word in err.value.detail, err.value.detail


@pytest.mark.parametrize("session, user", [("other-session", USER), (SESSION, "bob")])
def test_records_of_another_session_or_user_do_not_exist_for_this_run(records, session, user):
    with pytest.raises(ApiError, match="names no sample recorded in this training run's session"):
        records.training_batch(session, user, _request(_rl_datum(0, 1.0)))


def test_a_record_lives_a_day_after_its_last_use(records):
    store = records.store
    day_ago = time.time() - RECORD_TTL_S
    store.db.execute("UPDATE sampled_sequences SET last_used=? WHERE sequence_id=?", (day_ago + 60, IDS[0]))
    store.db.execute("UPDATE sampled_sequences SET last_used=? WHERE sequence_id=?", (day_ago - 1, IDS[1]))
    with pytest.raises(ApiError, match="names no sample recorded"):  # expired: gone even before a sweep
        records.training_batch(SESSION, USER, _request(_rl_datum(1, 1.0)))
    records.training_batch(SESSION, USER, _request(_rl_datum(0, 1.0)))  # used: its day starts again
    assert records.sweep() == 1  # the expired one went
    assert store.sampled_sequences(IDS, used_after=0).keys() == {IDS[0]}
    assert store.sampled_sequences(IDS, used_after=0)[IDS[0]]["last_used"] == pytest.approx(time.time(), abs=5)
