"""serving/model.py fastest_batch: the batch size a model replica forms when none is set.

The forward here is a stand-in with a known cost per batch size, read on a stand-in clock: the
test is about the choice made from the timings (the real forward is timed in the served tests)."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from serving.model import fastest_batch


def _timed(cost: dict[int, float], first: float = 0.0
           ) -> tuple[list[int], Callable[[int], None], Callable[[], float]]:
    """A forward that costs ``cost[n]`` seconds a call on a clock of its own (``first`` more on
    its first call), and the list of the sizes it was called with."""
    now = [0.0]
    calls: list[int] = []

    def forward(n: int) -> None:
        now[0] += cost[n] + (first if not calls else 0.0)
        calls.append(n)

    return calls, forward, lambda: now[0]


def test_the_fastest_per_image_wins_not_the_largest():
    # ResNet-18 at 224 px on this machine's CPU: per image, a batch of 8 beats one of 32.
    per_image = {4: 0.040, 8: 0.035, 16: 0.037, 32: 0.040}
    calls, forward, clock = _timed({n: n * v for n, v in per_image.items()}, first=5.0)
    size, per = fastest_batch(forward, 32, clock)
    assert size == 8
    assert per == pytest.approx(per_image)  # the first call's one-off cost is not counted
    assert calls == [4, 4, 8, 16, 32]


def test_a_model_faster_per_image_in_bigger_batches_gets_the_cap():
    _, forward, clock = _timed({n: 0.001 + n * 0.0002 for n in (4, 8, 16)})
    size, _ = fastest_batch(forward, 16, clock)
    assert size == 16


def test_within_three_percent_of_the_fastest_the_largest_wins():
    per_image = {4: 0.0100, 8: 0.0098, 12: 0.0100}  # 12: the cap, not a power of two, is tried too
    _, forward, clock = _timed({n: n * v for n, v in per_image.items()})
    assert fastest_batch(forward, 12, clock)[0] == 12
    per_image[12] = 0.0102  # 4 % slower than 8: no longer counted as fast
    _, forward, clock = _timed({n: n * v for n, v in per_image.items()})
    assert fastest_batch(forward, 12, clock)[0] == 8


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_a_cap_below_four_is_the_only_size(cap):
    calls, forward, clock = _timed({cap: 1.0})
    assert fastest_batch(forward, cap, clock)[0] == cap
    assert set(calls) == {cap}


def test_a_fast_forward_is_timed_again_and_its_fastest_call_counts():
    # A millisecond forward whose first call at 8 is held up (another process took the core):
    # one call each would pick 4; the fastest of the calls made in the budget picks 8.
    now = [0.0]
    calls: list[int] = []

    def forward(n: int) -> None:
        hiccup = 0.02 if n == 8 and 8 not in calls else 0.0
        now[0] += {4: 0.0020, 8: 0.0036}[n] + hiccup
        calls.append(n)

    size, per = fastest_batch(forward, 8, lambda: now[0], budget_s=0.1)
    assert size == 8 and per[8] == pytest.approx(0.00045)
    assert 10 <= calls.count(8) <= 30  # timed again until the 0.1 s budget was spent, then stopped
