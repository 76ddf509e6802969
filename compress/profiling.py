"""Peak memory of one block of work, for stage reports and benchmarks.

The process high-water mark (`getrusage().ru_maxrss`) only ever grows, so after a baseline
evaluation it says nothing about the stage that follows. `PeakMemory` instead samples the
resident set size from a background thread while the block runs and reports the peak above
the size at entry: the memory the block itself needed. At entry, garbage is collected and free
heap pages are returned to the OS (glibc `malloc_trim`), or memory freed by earlier work and
reused by this block would not show. Sampling every few milliseconds can miss a spike shorter
than that; the tensors of a calibration pass live far longer.

On a CUDA machine it also reports torch's peak allocated device memory for the block (its
own counter, reset at entry: exact, not sampled).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import resource
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

_STATM = Path("/proc/self/statm")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _return_free_heap_to_os() -> None:
    """Collect garbage and hand glibc's free heap pages back (malloc_trim), so that memory an
    earlier block freed but the allocator kept does not hide this block's own growth."""
    gc.collect()
    # Not glibc: the start size may include free heap, and increases may read low.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; elsewhere the high-water mark, an upper bound)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class MemoryPeak:
    rss_at_start_bytes: int
    peak_rss_bytes: int
    cuda_peak_bytes: int | None  # None without CUDA

    @property
    def peak_rss_increase_bytes(self) -> int:
        return max(0, self.peak_rss_bytes - self.rss_at_start_bytes)

    def to_dict(self) -> dict[str, int | None]:
        return {
            "rss_at_start_bytes": self.rss_at_start_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_rss_increase_bytes": self.peak_rss_increase_bytes,
            "cuda_peak_bytes": self.cuda_peak_bytes,
        }


class PeakMemory:
    """`with PeakMemory() as peak: ...` then `peak.result` is a `MemoryPeak`."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._peak = 0
        self._start = 0
        self._thread: threading.Thread | None = None
        self.result: MemoryPeak | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._peak = max(self._peak, current_rss_bytes())

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        _return_free_heap_to_os()
        self._start = self._peak = current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, current_rss_bytes())
        cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        self.result = MemoryPeak(self._start, self._peak, cuda_peak)
