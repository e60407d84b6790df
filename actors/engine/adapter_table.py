"""The torch engine's adapter bookkeeping: which adapter lives in which LoRA slot, and which slot may be reused.

Slot 0 is the bare base model; slots 1..num_slots-1 hold adapters. A slot is *pinned*
while sample requests that use it are queued or running: it is never evicted, and an
unload or reload of its adapter only *retires* it (new requests no longer see it; the
slot is freed when its last request ends). When every slot is taken, loading a new
adapter evicts the least recently used unpinned one; when every slot is pinned, the
load has to wait (`AdapterSlotsBusy`).

Pure bookkeeping: the caller writes and clears the slot tensors.
"""

from __future__ import annotations

import itertools
from collections import Counter

from actors.engine.interface import AdapterSlotsBusy, UnknownAdapterError
from actors.lora import BASE_SLOT


class AdapterTable:
    def __init__(self, num_slots: int):
        if num_slots < 2:
            raise ValueError("an engine needs at least one adapter slot besides the base model")
        self.num_slots = num_slots
        self.slot_of_id: dict[str, int] = {}
        self.id_of_slot: dict[int, str | None] = {}  # occupied slots; None = retired, still pinned
        self.pins: Counter[int] = Counter()
        self.last_used: dict[int, int] = {}
        self._clock = itertools.count()

    def loaded(self) -> list[str]:
        return sorted(self.slot_of_id)

    def slot_for(self, adapter_id: str | None) -> int:
        """The slot that serves `adapter_id` (None = the base model), marked as just used."""
        if adapter_id is None:
            return BASE_SLOT
        slot = self.slot_of_id.get(adapter_id)
        if slot is None:
            raise UnknownAdapterError(f"adapter {adapter_id!r} is not loaded on this engine "
                                      "(never loaded, unloaded, or evicted to make room)")
        self.last_used[slot] = next(self._clock)
        return slot

    def pin(self, slot: int) -> None:
        if slot != BASE_SLOT:
            self.pins[slot] += 1

    def unpin(self, slot: int) -> int | None:
        """Drop one pin; return the slot if it was retired and is now free (to clear)."""
        if slot == BASE_SLOT:
            return None
        self.pins[slot] -= 1
        if self.pins[slot] > 0:
            return None
        del self.pins[slot]
        if slot in self.id_of_slot and self.id_of_slot[slot] is None:
            self._free(slot)
            return slot
        return None

    def choose_slot(self, adapter_id: str) -> int:
        """Where a (re)load of `adapter_id` should go; changes nothing.

        Preference: the adapter's own slot if nothing pins it, then a free slot, then
        the least recently used unpinned slot.
        """
        own = self.slot_of_id.get(adapter_id)
        if own is not None and not self.pins[own]:
            return own
        free = [s for s in range(1, self.num_slots) if s not in self.id_of_slot]
        if free:
            return free[0]
        evictable = [s for s, owner in self.id_of_slot.items() if owner is not None and not self.pins[s]]
        if not evictable:
            raise AdapterSlotsBusy(f"all {self.num_slots - 1} adapter slots are in use by running requests")
        return min(evictable, key=lambda s: self.last_used.get(s, -1))

    def assign(self, adapter_id: str, slot: int) -> list[int]:
        """Record `adapter_id` in `slot` (chosen by choose_slot, already written).

        Returns slots that became free and should be cleared: the adapter's previous
        slot, unless requests still pin it (then it retires).
        """
        evicted = self.id_of_slot.get(slot)
        if evicted is not None and evicted != adapter_id:
            del self.slot_of_id[evicted]
        freed = []
        previous = self.slot_of_id.get(adapter_id)
        if previous is not None and previous != slot:
            freed += self._retire(previous)
        self.slot_of_id[adapter_id] = slot
        self.id_of_slot[slot] = adapter_id
        self.last_used[slot] = next(self._clock)
        return freed

    def discard_slot(self, slot: int) -> None:
        """Forget whatever `slot` held (a load into it failed half way)."""
        owner = self.id_of_slot.get(slot)
        if owner is not None:
            del self.slot_of_id[owner]
        if slot in self.id_of_slot:
            self._retire_or_free(slot)

    def remove(self, adapter_id: str) -> list[int]:
        """Unload: new requests stop seeing it; returns its slot if free to clear now."""
        slot = self.slot_of_id.pop(adapter_id, None)
        return [] if slot is None else self._retire(slot)

    def _retire(self, slot: int) -> list[int]:
        self.id_of_slot[slot] = None
        return self._retire_or_free(slot)

    def _retire_or_free(self, slot: int) -> list[int]:
        if self.pins[slot]:
            self.id_of_slot[slot] = None
            return []
        self._free(slot)
        return [slot]

    def _free(self, slot: int) -> None:
        self.id_of_slot.pop(slot, None)
        self.last_used.pop(slot, None)
