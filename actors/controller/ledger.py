"""Per-model `seq_id` ordering.

The SDK numbers every model-mutating request 1, 2, 3, … (create/load is the implicit
0) and expects strict execution in that order. Arrivals are mostly in order, except
the chunks of one forward_backward call (sent concurrently, first chunk last) and
retries after a lost response (duplicates). The ledger buffers gaps, releases
contiguous runs, and answers a repeated seq_id with the request_id it already got.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SeqLedger:
    next_seq: int = 1
    _waiting: dict[int, Any] = field(default_factory=dict)
    _request_ids: dict[int, str] = field(default_factory=dict)

    def known_request(self, seq_id: int) -> str | None:
        """The request_id already given to this seq_id, if any (a duplicate submission)."""
        return self._request_ids.get(seq_id)

    def submit(self, seq_id: int, request_id: str, op: Any) -> list[Any]:
        """Record `op` for `seq_id`; return the ops now ready to run, in order."""
        if seq_id < self.next_seq or seq_id in self._waiting:
            raise ValueError(f"seq_id {seq_id} was already used for this model")
        self._request_ids[seq_id] = request_id
        self._waiting[seq_id] = op
        released = []
        while self.next_seq in self._waiting:
            op = self._waiting.pop(self.next_seq)
            if op is not None:  # None marks a refused request: its seq_id is spent, nothing runs
                released.append(op)
            self.next_seq += 1
        return released

    def skip(self, seq_id: int) -> list[Any]:
        """Count a refused seq_id as done (the SDK never resends it); return ops now ready."""
        if self.known_request(seq_id) is not None or seq_id < self.next_seq:
            return []
        return self.submit(seq_id, "", None)

    def drain(self) -> list[Any]:
        """Take every op still waiting for a gap (the run is going away)."""
        ops = list(self._waiting.values())
        self._waiting.clear()
        return ops

    def drain_preview(self) -> list[Any]:
        """The ops waiting for a gap, left in place."""
        return [op for op in self._waiting.values() if op is not None]

    @property
    def gaps(self) -> list[int]:
        """seq_ids still missing below the highest one received."""
        if not self._waiting:
            return []
        return [s for s in range(self.next_seq, max(self._waiting)) if s not in self._waiting]
