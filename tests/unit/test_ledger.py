"""The per-model seq_id ledger: strict order, buffered gaps, duplicates."""

import pytest

from actors.controller.ledger import SeqLedger


def test_in_order_requests_are_released_at_once():
    ledger = SeqLedger()
    assert ledger.submit(1, "r1", "op1") == ["op1"]
    assert ledger.submit(2, "r2", "op2") == ["op2"]


def test_out_of_order_chunks_wait_for_the_gap():
    # the SDK sends a forward_backward's chunks concurrently, first chunk last
    ledger = SeqLedger()
    assert ledger.submit(2, "r2", "b") == []
    assert ledger.submit(3, "r3", "c") == []
    assert ledger.gaps == [1]
    assert ledger.submit(1, "r1", "a") == ["a", "b", "c"]
    assert ledger.next_seq == 4 and ledger.gaps == []


def test_duplicate_submission_is_recognised_and_rejected_by_submit():
    ledger = SeqLedger()
    ledger.submit(1, "r1", "a")
    assert ledger.known_request(1) == "r1"
    assert ledger.known_request(2) is None
    with pytest.raises(ValueError):
        ledger.submit(1, "again", "a")


def test_duplicate_of_a_buffered_request_is_known_too():
    ledger = SeqLedger()
    ledger.submit(3, "r3", "c")
    assert ledger.known_request(3) == "r3"
    with pytest.raises(ValueError):
        ledger.submit(3, "r3b", "c")


def test_drain_returns_the_ops_stuck_behind_a_gap():
    ledger = SeqLedger()
    ledger.submit(2, "r2", "b")
    ledger.submit(4, "r4", "d")
    assert sorted(ledger.drain()) == ["b", "d"]
    assert ledger.gaps == []


def test_a_refused_seq_id_is_skipped_and_releases_what_waited_behind_it():
    # the SDK spends a seq_id even when its submission is refused, and never resends it
    ledger = SeqLedger()
    ledger.submit(1, "r1", "a")
    assert ledger.submit(3, "r3", "c") == []
    assert ledger.skip(2) == ["c"]
    assert ledger.next_seq == 4
    assert ledger.skip(3) == [] and ledger.skip(1) == []  # already used: nothing changes
