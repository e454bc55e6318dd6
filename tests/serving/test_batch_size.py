"""serving/model.py fastest_batch: the batch size a model replica forms when none is set.

The forward here is a stand-in with a known cost per batch size, read on a stand-in clock: the
test is about the choice made from the timings (the real forward is timed in the served tests)."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from serving.model import fastest_batch


def _timed(cost: Callable[[int, int], float]) -> tuple[list[int], Callable[[int], None], Callable[[], float]]:
    """A forward whose ``k``-th call (from 0) at size ``n`` takes ``cost(n, k)`` seconds on a clock
    of its own, and the list of the sizes it was called with."""
    now = [0.0]
    calls: list[int] = []

    def forward(n: int) -> None:
        now[0] += cost(n, calls.count(n))
        calls.append(n)

    return calls, forward, lambda: now[0]


def test_the_fastest_per_image_wins_not_the_largest():
    # ResNet-18 at 224 px on this machine's CPU: per image, a batch of 8 beats one of 32.
    per_image = {1: 0.041, 2: 0.040, 4: 0.040, 8: 0.035, 16: 0.040, 32: 0.045}
    calls, forward, clock = _timed(lambda n, k: n * per_image[n] + (5.0 if k == 0 and n == 1 else 0.0))
    size, per = fastest_batch(forward, 32, clock, overhead_s=0)
    assert size == 8
    assert per == pytest.approx(per_image)  # the first call's one-off cost is not counted
    # A warm-up call, then every size in turn, twice (two rounds take longer than the 0.5 s budget).
    assert calls == [1, *per_image, *per_image]


def test_a_model_faster_per_image_in_bigger_batches_gets_the_cap():
    calls, forward, clock = _timed(lambda n, k: 0.001 + n * 0.0002)
    assert fastest_batch(forward, 16, clock, overhead_s=0)[0] == 16
    assert calls.count(16) > 2  # a fast forward: rounds go on until 0.5 s of them


def test_within_three_percent_of_the_fastest_the_largest_wins():
    per_image = {1: 0.0130, 2: 0.0120, 4: 0.0110, 8: 0.0098, 12: 0.0100}  # 12, the cap, is tried too
    _, forward, clock = _timed(lambda n, k: n * per_image[n])
    assert fastest_batch(forward, 12, clock, overhead_s=0)[0] == 12  # 2 % slower than 8: fast enough
    per_image[12] = 0.0102  # 4 % slower than 8: no longer counted as fast
    _, forward, clock = _timed(lambda n, k: n * per_image[n])
    assert fastest_batch(forward, 12, clock, overhead_s=0)[0] == 8


def test_resnet18_as_timed_by_its_replica_gets_batches_of_8():
    # A ResNet-18 replica's own timings (ms an image, the 1 ms per batch included; 2026-12-04): 32 is
    # 4 % slower than 8, and 32 clients were served faster in batches of 8 (49.7 vs 47.4 img/s).
    per_image = {1: 25.36, 2: 21.80, 4: 19.56, 8: 18.82, 16: 20.56, 32: 19.57}
    _, forward, clock = _timed(lambda n, k: n * per_image[n] / 1e3)
    assert fastest_batch(forward, 32, clock, overhead_s=0)[0] == 8


@pytest.mark.parametrize(("cap", "sizes"), [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (6, [1, 2, 4, 6])])
def test_the_sizes_tried_are_the_powers_of_two_below_the_cap_and_the_cap(cap, sizes):
    calls, forward, clock = _timed(lambda n, k: 1.0)
    size, per = fastest_batch(forward, cap, clock, overhead_s=0)
    assert sorted(per) == sizes and calls[1:] == sizes * 2
    assert size == cap  # 1 s a call whatever the size: the largest is fastest per image


def test_a_call_slowed_by_something_else_does_not_decide():
    # The first timed call at 8 is held up (another process took the core): timed once each,
    # 4 would win; each size's fastest call picks 8.
    per_call = {1: 0.0010, 2: 0.0012, 4: 0.0020, 8: 0.0036}
    calls, forward, clock = _timed(lambda n, k: per_call[n] + (0.02 if n == 8 and k == 0 else 0.0))
    size, per = fastest_batch(forward, 8, clock, overhead_s=0)
    assert size == 8 and per[8] == pytest.approx(0.00045)
    assert calls.count(8) > 2


def test_the_serving_work_per_batch_counts_for_a_fast_forward():
    # The small ConvNet: its forward costs about the same per image at every size, within the timing
    # noise (8 even a little faster); a batch's serving work besides the forward (1 ms) is what
    # bigger batches save, so it gets the cap, while a slow forward is decided by the forward alone.
    forward_per_image = {1: 0.00030, 2: 0.00024, 4: 0.00020, 8: 0.00015, 16: 0.00020, 32: 0.00021}
    _, forward, clock = _timed(lambda n, k: n * forward_per_image[n])
    size, per = fastest_batch(forward, 32, clock)
    assert size == 32 and per[32] == pytest.approx(0.00021 + 0.001 / 32)  # 8: 0.00015 + 0.000125
    _, forward, clock = _timed(lambda n, k: n * forward_per_image[n])
    assert fastest_batch(forward, 32, clock, overhead_s=0)[0] == 8
    slow = {n: 100 * v for n, v in forward_per_image.items()}  # 15-30 ms an image: the 1 ms hardly counts
    _, forward, clock = _timed(lambda n, k: n * slow[n])
    assert fastest_batch(forward, 32, clock)[0] == 8
