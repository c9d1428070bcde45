"""fastlm.schedule: warmup then cosine, linear, constant and WSD, at the points that define them."""
from __future__ import annotations

import itertools

import pytest

from fastlm.train.schedule import SCHEDULES, lr_at

BASE = {"lr": 1e-3, "min_lr": 1e-4, "warmup": 10, "total": 110}


def lrs(schedule, **kw):
    args = {**BASE, **kw}
    return [lr_at(s, schedule=schedule, **args) for s in range(args["total"] + 5)]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_is_linear_from_lr_over_warmup(schedule):
    got = lrs(schedule)
    assert got[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert got[10] == pytest.approx(1e-3)  # the peak right after warmup (cosine/linear start)


def test_cosine_midpoint_and_end():
    got = lrs("cosine")
    assert got[60] == pytest.approx(5.5e-4)  # half way: (lr + min_lr) / 2
    assert got[110] == pytest.approx(1e-4) and got[114] == pytest.approx(1e-4)
    assert all(a >= b for a, b in itertools.pairwise(got[10:]))


def test_linear_is_a_straight_line():
    got = lrs("linear")
    assert got[35] == pytest.approx(1e-3 - 0.25 * 9e-4)
    assert got[60] == pytest.approx(5.5e-4) and got[110] == pytest.approx(1e-4)
    diffs = [a - b for a, b in itertools.pairwise(got[10:111])]
    assert max(diffs) == pytest.approx(min(diffs))


def test_constant_stays_at_peak():
    assert set(lrs("constant")[10:]) == {1e-3}


def test_wsd_stable_then_decays_over_the_last_fraction():
    got = lrs("wsd", decay_fraction=0.2)  # decay over steps 88..110
    assert set(got[10:88]) == {1e-3}
    assert got[99] == pytest.approx(1e-3 + (1e-4 - 1e-3) * 11 / 22)
    assert got[110] == pytest.approx(1e-4)
    assert all(a > b for a, b in itertools.pairwise(got[88:111]))
    # Extending a run moves only the decay: the stable phase is unchanged.
    longer = lrs("wsd", decay_fraction=0.2, total=220)
    assert longer[:88] == got[:88]


def test_no_warmup_and_degenerate_totals():
    assert lr_at(0, **{**BASE, "warmup": 0}, schedule="cosine") == pytest.approx(1e-3)
    assert lr_at(12, **{**BASE, "total": 5}, schedule="cosine") == pytest.approx(1e-3)  # all warmup
    with pytest.raises(ValueError, match="schedule must be one of cosine, linear"):
        lr_at(0, **BASE, schedule="exp")
