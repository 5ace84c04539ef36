"""Pace and backlog estimate: the arithmetic behind `mirwatch status` and the `progress` events."""

from __future__ import annotations

import pytest

from mirwatch import progress


def test_rate_is_jobs_over_the_time_since_the_first_of_them():
    # 30 done over the last 15 minutes: 120/h; 240 left take 2 h.
    assert progress.estimate(queued=239, running=1, done_recently=30, span=900) == {
        "done_last_hour": 30, "per_hour": 120.0, "eta_seconds": 7200}


def test_a_burst_right_after_start_is_not_read_as_a_huge_rate():
    # 10 jobs within 5 s: counted over at least a minute (600/h), not 7,200/h.
    assert progress.estimate(queued=60, running=0, done_recently=10, span=5)["per_hour"] == 600.0


def test_no_rate_yet_and_nothing_left():
    assert progress.estimate(queued=5, running=0, done_recently=0, span=0)["eta_seconds"] is None
    assert progress.estimate(queued=0, running=0, done_recently=4, span=600)["eta_seconds"] == 0


@pytest.mark.parametrize("seconds, text", [
    (None, "unknown"), (0, "0 s"), (42, "42 s"), (45 * 60 + 10, "45 min"), (7800, "2 h 10 min"),
    (3 * 86400 + 4 * 3600 + 59, "3 d 4 h"),
])
def test_human_durations(seconds, text):
    assert progress.human(seconds) == text
