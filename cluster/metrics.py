"""Merging the metrics of parts of one batch (DP shards, microbatches) as the SDK merges chunks.

Metric keys are `<name>:<reduction>`; the suffix says how parts combine: `sum` adds,
`mean` averages weighted by each part's datum count, `min` / `max` over the parts that
had datums; anything else keeps the first part's value.
"""

from __future__ import annotations


def merge_metrics(shards: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Combine per-rank metrics as the SDK combines per-chunk ones (by key suffix)."""
    merged: dict[str, float] = {}
    keys = {k for metrics, _ in shards for k in metrics}
    for key in sorted(keys):
        present = [(m[key], n) for m, n in shards if key in m]
        reduction = key.rsplit(":", 1)[-1]
        if reduction == "sum":
            merged[key] = float(sum(v for v, _ in present))
        elif reduction == "mean":
            total = sum(n for _, n in present)
            merged[key] = float(sum(v * n for v, n in present) / total) if total else 0.0
        elif reduction == "min":
            merged[key] = float(min(v for v, n in present if n) if any(n for _, n in present) else 0.0)
        elif reduction == "max":
            merged[key] = float(max(v for v, n in present if n) if any(n for _, n in present) else 0.0)
        else:
            merged[key] = float(present[0][0])
    return merged
