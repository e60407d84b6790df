"""Giving memory the allocators keep for reuse back to the device or the OS (release_memory)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

import torch

log = logging.getLogger(__name__)


def return_memory(device: torch.device) -> None:
    """Hand memory the allocators keep for reuse back to the device / the OS."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        log.info("no glibc malloc_trim: released CPU memory stays with the allocator")
        return None


_LIBC = _load_libc()
