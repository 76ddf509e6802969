"""PeakMemory: the peak of one block above where it started, not the process high-water mark."""

from __future__ import annotations

import time

import torch

from compress.profiling import PeakMemory, current_rss_bytes

MB = 2**20


def test_peak_of_a_block_counts_what_it_allocated_and_freed():
    with PeakMemory() as memory:
        block = torch.ones(256 * MB // 4)  # 256 MiB, touched, then freed inside the block
        time.sleep(0.05)  # ten sampling intervals: a tensor that lives this long is seen
        del block
    result = memory.result
    assert result.peak_rss_increase_bytes >= 200 * MB
    assert result.peak_rss_bytes >= result.rss_at_start_bytes + 200 * MB
    assert result.cuda_peak_bytes is None or not torch.cuda.is_available()


def test_a_later_block_does_not_inherit_an_earlier_peak():
    big = torch.ones(256 * MB // 4)
    del big
    with PeakMemory() as memory:
        small = torch.ones(MB // 4)
        del small
    assert memory.result.peak_rss_increase_bytes < 64 * MB
    assert current_rss_bytes() > 0
