"""The measurement's helpers that need no model: batches of a fixed size, the memory meter on
this machine's CPU, and the pair of values of the two arms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.validation.measure import Pair, PeakMemory, _batches


def test_batches_have_the_concurrency_asked_for() -> None:
    assert _batches([1, 2, 3], 1) == [[1], [2], [3]]
    assert _batches([1, 2, 3], 2) == [[1, 2], [3, 1]]  # the last batch filled from the start
    assert _batches([1], 4) == [[1, 1, 1, 1]]


def test_the_cpu_meter_sees_what_a_call_allocates() -> None:
    meter = PeakMemory("cpu")
    size = 64 * 2**20

    def allocate() -> None:
        block = np.ones(size, dtype=np.uint8)  # touched, so resident
        assert block.sum() == size

    peak = meter.measure(allocate)
    assert size * 0.9 <= peak <= size * 1.5, (peak, meter.method)
    assert meter.measure(lambda: None) < size / 4  # freed memory was handed back before measuring


@pytest.mark.gpu
def test_the_gpu_meter_sees_what_a_call_allocates() -> None:
    import torch

    meter = PeakMemory("cuda")
    held = torch.ones(2**20, device="cuda")  # allocated before: not counted
    size = 64 * 2**20

    def allocate() -> None:
        block = torch.ones(size // 4, device="cuda")  # float32: 4 bytes each
        assert block.sum().item() == size // 4

    peak = meter.measure(allocate)
    assert size <= peak <= size * 1.1 and meter.method.startswith("torch.cuda.max_memory_allocated")
    del held


def test_pairs() -> None:
    assert Pair(110.0, 100.0).relative_change == pytest.approx(0.1)
    assert Pair(0.7, 0.8).change == pytest.approx(-0.1)
    assert Pair(0, 0).relative_change == 0.0 and math.isinf(Pair(1, 0).relative_change)
