"""Keep a process's freed memory mapped, for its next round to reuse.

Every round the server allocates and frees arrays of the same sizes: uploads, averages, re-factorised adapters,
their packed copies, the activations of scoring the held-out set. glibc hands blocks over 128 KiB back to the
kernel when they are freed (and trims the top of its heap), so the next round's arrays land on fresh pages and
each page faults on first touch. At LLaMA-7B's shape that is about 8,000 faults per pass over the adapters; on a
2-core VM they tripled the cost of FedSVD's thin products (bench/server_step.py). With both thresholds raised,
freed blocks stay in the heap and are reused: the process keeps its high-water mark of memory, which the next
round reaches again anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap and are reused; larger ones (a whole model's weights on load) are still
# mapped on their own and returned when freed. 256 MiB is above any one adapter array of a 70B model at r = 64.
_HEAP_BLOCKS_BELOW = 256 * 2**20
# The heap's free top is kept up to this much instead of being trimmed after every large free.
_KEEP_FREE_TOP = 2**31 - 1


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that cannot be done (another C
    library, another system), which changes nothing but speed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no C library found, or one without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; both are tried, so that one refused setting still leaves the other.
    mapped = mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS_BELOW) == 1
    trimmed = mallopt(_M_TRIM_THRESHOLD, _KEEP_FREE_TOP) == 1
    return mapped and trimmed
