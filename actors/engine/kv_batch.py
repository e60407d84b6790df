"""The running batch's KV cache: preallocated buffers that rows join and leave in place.

Layout. Each layer's keys and values live in one buffer `[R, H, C, D]` (R rows, C columns
of capacity); rows `0 .. len(batch)-1` are live, and the live columns are `[start, end)`.
Every row's tokens so far end at column `end - 1` (right-aligned), so one decode step writes
every row's new token into column `end`. `mask[i, c]` says whether column c holds a real
token of row i: the columns before a row's first token do not, nor does the gap between a
cached prompt prefix and the rest of its prompt (prefilled separately, see torch_backend.py).
`positions[i]` is the position id of the token row i feeds next (its true length so far), so
rotary embeddings see every sequence as if it ran alone. Masked columns change nothing:
softmax gives them weight exactly 0, and they only ever hold finite values (zeros, or keys
and values a model computed).

Why preallocated: growing a cache by concatenation allocates, and the OS zero-fills, a new
buffer per layer per step; on a 2-core CPU that was about 30% of a decode step of 64 rows of
the built-in model. Here a step writes one column in place. The columns run out only every
so often (`ensure_column`): the buffers are then copied into ones twice as wide, and the copy
drops the columns no live row attends to any more.

Rows join from a prefill (`join`: each prompt's cache, replicated to one row per sample,
is copied into the free rows, right-aligned at `end`) and leave when they finish (`keep`:
the last live rows move into the holes, so a removal copies only as many rows as left, and
the row order changes: `keep` returns it).
"""

from __future__ import annotations

import torch

# columns a growing window gains at least (each growth copies the whole cache)
_MIN_GROWTH = 64


class KvBatch:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_rows: int):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device, self.max_rows = dtype, device, max_rows
        self.rows = 0
        self.start = self.end = 0
        self.first: list[int] = []  # per live row: the first column it attends to
        self.row_slots: list[int] = []  # per live row: its LoRA slot (as `slots`, for the one-slot fast path)
        self._allocate(0, 0)

    def __len__(self) -> int:
        return self.rows

    @property
    def capacity(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def single_slot(self) -> int | None:
        """The slot every live row uses, or None when they mix adapters."""
        slots = set(self.row_slots)
        return next(iter(slots)) if len(slots) == 1 else None

    # -- rows joining and leaving ----------------------------------------------------------

    def join(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor, source: list[int],
             positions: list[int], pending: torch.Tensor, slots: list[int], room: int) -> None:
        """Add one row per entry of `source`, after the live rows.

        keys[l] / values[l] `[P, H, W, D]` and mask `[P, W]` are a prefill's cache of P prompts
        (left-padded to width W); new row j is prompt `source[j]`, feeds `pending[j]` next at
        position `positions[j]`, and uses LoRA slot `slots[j]`. `room`: how many more columns
        the new rows may need after this one (their longest remaining generation), a hint
        for how wide to grow.
        """
        count, width = len(source), mask.shape[1]
        self.reserve(self.rows + count, width, room)
        new, columns = slice(self.rows, self.rows + count), slice(self.end - width, self.end)
        index = torch.tensor(source, device=self.device)
        for buffer, prompts in zip(self.keys + self.values, keys + values, strict=True):
            buffer[new, :, columns] = prompts.index_select(0, index)
        picked = mask.index_select(0, index)
        self.mask[new] = False
        self.mask[new, columns] = picked
        self.positions[new] = torch.tensor(positions, device=self.device)
        self.pending[new] = pending
        self.slots[new] = torch.tensor(slots, device=self.device)
        # a bool row's argmax is its first True: the first real column of each new row
        self.first += [self.end - width + c for c in picked.to(torch.uint8).argmax(dim=1).tolist()]
        self.row_slots += list(slots)
        self.rows += count
        self.start = min(self.first)

    def reserve(self, rows: int, width: int, room: int) -> None:
        """Make room for `rows` rows in all, rows joining with `width` columns of prompt, and the next step's
        column; `room` (the longest generation they may still run) bounds how wide the columns grow. An
        admission reserves for all its rows at once, so its joins copy the cache at most once."""
        capacity, cols = self.capacity
        if rows <= capacity and self.end >= width and self.end < cols:
            return
        if rows > capacity:
            capacity = max(rows, min(self.max_rows, 2 * capacity))
        self._relayout(capacity, left=width, right=max(1, min(room, max(_MIN_GROWTH, width))))

    def keep(self, live: list[int]) -> list[int]:
        """Keep only the rows `live` (ascending indices); return the new order: row i is former row order[i]."""
        count = len(live)
        kept = set(live)
        holes = [i for i in range(count) if i not in kept]
        movers = [i for i in live if i >= count]
        order = list(range(count))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        if holes:
            dst = torch.tensor(holes, device=self.device)
            src = torch.tensor(movers, device=self.device)
            for buffer in self.keys + self.values + [self.mask, self.positions, self.pending, self.slots]:
                buffer.index_copy_(0, dst, buffer.index_select(0, src))
        self.first = [self.first[i] for i in order]
        self.row_slots = [self.row_slots[i] for i in order]
        self.rows = count
        if count:
            self.start = min(self.first)
        else:
            self.start = self.end = 0
        return order

    # -- a decode step -------------------------------------------------------------------

    def ensure_column(self) -> None:
        """Make sure column `end` exists, for the token a decode step writes."""
        rows, cols = self.capacity
        if self.end >= cols:
            width = self.end - self.start
            self._relayout(rows, left=0, right=max(_MIN_GROWTH, width))

    def advance(self) -> None:
        """After a decode step wrote column `end` for every live row."""
        self.end += 1
        self.positions[:self.rows] += 1

    # -- buffers -------------------------------------------------------------------------

    def _allocate(self, rows: int, cols: int) -> None:
        shape = (rows, self.kv_heads, cols, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.mask = torch.zeros(rows, cols, dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.pending = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.slots = torch.zeros(rows, dtype=torch.long, device=self.device)

    def _relayout(self, rows: int, left: int, right: int) -> None:
        """New buffers of `rows` rows; the live window is copied so that it ends at column max(width, left),
        with `right` free columns after it. Columns before the window are dropped."""
        width = self.end - self.start
        end = max(width, left)
        old = (self.keys + self.values, self.mask, self.positions, self.pending, self.slots)
        self._allocate(rows, end + right)
        live, src, dst = slice(0, self.rows), slice(self.start, self.end), slice(end - width, end)
        for new, previous in zip(self.keys + self.values, old[0], strict=True):
            new[live, :, dst] = previous[live, :, src]
        self.mask[live, dst] = old[1][live, src]
        for new, previous in zip((self.positions, self.pending, self.slots), old[2:]):
            new[live] = previous[live]
        shift = end - width - self.start
        self.first = [c + shift for c in self.first]
        self.start, self.end = end - width, end


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: (input_ids, attention_mask, position_ids), each [B, L]."""
    width = max(len(p) for p in prompts)
    device = prompts[0].device
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        attention_mask[row, width - len(prompt):] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids
