"""Comparing float32 results that were computed two ways (batched vs one by one, fused vs not).

Such results differ by the rounding of their summations, which depends on the order of
the sums: CPUs with different vector widths (AVX2, AVX-512) and different BLAS kernels
sum in different orders. That rounding scales with the terms being summed, not with the
result, so an element of a gradient that is a near-zero sum of large terms carries an
absolute error of the terms' size. The absolute tolerance is therefore taken relative to
the tensor's own scale (its largest magnitude), which bounds the terms of these sums.
FP32_SUM_REL has ~10x margin over the worst seen across AVX-512, AVX2 and scalar kernels.
"""

from __future__ import annotations

import numpy as np
import torch

FP32_SUM_REL = 2e-5


def assert_close_at_scale(actual, expected, *, rtol: float = 1e-4, rel: float = FP32_SUM_REL,
                          msg: str | None = None) -> None:
    """`actual` == `expected` up to float32 summation rounding at `expected`'s scale."""
    actual_t, expected_t = _tensor(actual), _tensor(expected)
    scale = float(expected_t.abs().max()) if expected_t.numel() else 0.0
    torch.testing.assert_close(actual_t, expected_t, rtol=rtol, atol=rel * scale + 1e-12, msg=msg)


def _tensor(value) -> torch.Tensor:
    # np.array copies: wire arrays are read-only views, which torch warns about
    return torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else torch.as_tensor(value)
