"""PeakMemorySampler: the peak it reports rises by what the block allocated, and only by that."""

from __future__ import annotations

import mmap

import pytest
import torch

from streamquant.memory import CUDA_METHOD, PeakMemorySampler, read_rss

MIB = 2**20
BIG = 64 * MIB  # above glibc's largest mmap threshold (32 MiB): freed at once, never kept
SLACK = 8 * MIB  # interpreter and allocator noise allowed on top


def test_read_rss_reports_positive_sizes():
    anon, file = read_rss()
    assert anon > 0 and file > 0


def test_peak_rises_by_a_live_tensor():
    with PeakMemorySampler() as sampler:
        x = torch.ones(BIG // 4)  # ones, not empty: untouched pages are not resident
    peak = sampler.result
    assert peak.method == "cpu_rss_anon_sampled_5ms"
    assert BIG <= peak.peak_bytes <= BIG + SLACK
    assert peak.baseline_bytes > 0 and peak.file_backed_peak_bytes is not None
    del x


def test_freed_tensor_counted_at_its_peak_and_returned_to_the_os():
    with PeakMemorySampler() as sampler:
        x = torch.ones(BIG // 4)
        sampler.sample()
        del x
        sampler.sample()
    peak = sampler.result
    assert BIG <= peak.peak_bytes <= BIG + SLACK
    times = [t for t, _ in peak.timeline]
    assert times == sorted(times) and len(times) >= 3
    assert peak.timeline[-1][1] < SLACK  # a large block is unmapped on free: RssAnon falls back


def test_memory_held_before_entry_is_baseline():
    held = torch.ones(BIG // 4)
    with PeakMemorySampler() as sampler:
        held.add_(1)  # touching already-resident memory allocates nothing
    assert sampler.result.peak_bytes < SLACK
    assert sampler.result.baseline_bytes >= BIG


def test_file_backed_pages_reported_separately(tmp_path):
    path = tmp_path / "blob.bin"
    size = 32 * MIB
    path.write_bytes(b"\x01" * size)
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapped:
        with PeakMemorySampler() as sampler:
            checksum = sum(mapped[i] for i in range(0, size, mmap.PAGESIZE))  # fault every page in
    assert checksum == size // mmap.PAGESIZE
    assert sampler.result.file_backed_peak_bytes >= size - MIB
    assert sampler.result.peak_bytes < SLACK
    # the file-backed timeline has the anonymous one's samples (same times) and reaches the file-backed peak
    anon, file_backed = sampler.result.timeline, sampler.result.file_backed_timeline
    assert [t for t, _ in file_backed] == [t for t, _ in anon] and anon
    assert max(b for _, b in file_backed) == sampler.result.file_backed_peak_bytes


def test_interval_named_in_method():
    with PeakMemorySampler(interval_s=0.02) as sampler:
        pass
    assert sampler.result.method == "cpu_rss_anon_sampled_20ms"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_is_exact():
    with PeakMemorySampler("cuda") as sampler:
        x = torch.ones(BIG // 4, device="cuda")
        del x
    assert sampler.result.method == CUDA_METHOD
    assert sampler.result.peak_bytes == BIG
    assert sampler.result.file_backed_peak_bytes is None and sampler.result.timeline == ()
