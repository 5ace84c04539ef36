"""How fast the library is being worked through, and when the backlog will be done.

The rate is the jobs done in the last hour divided by the time since the
first of them finished (at least a minute): it follows the current pace
within minutes of a start, and falls by itself once work stops, so a stale
rate does not promise an early finish. With a shared queue it counts every
host's jobs, which is the rate that empties the shared backlog.
"""

from __future__ import annotations

from typing import Any

WINDOW = 3600.0
MIN_SPAN = 60.0


def estimate(queued: int, running: int, done_recently: int, span: float) -> dict[str, Any]:
    """Rate per hour and seconds until `queued` + `running` jobs are done (None: no rate yet)."""
    # Rounded first, so that the ETA follows from the rate as printed.
    per_hour = round(done_recently * 3600.0 / max(span, MIN_SPAN), 1) if done_recently else 0.0
    left = queued + running
    eta = round(left / per_hour * 3600.0) if per_hour and left else (0 if not left else None)
    return {"done_last_hour": done_recently, "per_hour": per_hour, "eta_seconds": eta}


def of(jobs: Any, counts: dict[str, int] | None = None, *, wait: bool = True) -> dict[str, Any]:
    """`estimate` for a queue (`counts` if already read; `wait` as for the queue's reads)."""
    counts = counts or jobs.counts(wait=wait)
    done, span = jobs.recent_done(WINDOW, wait=wait)
    return estimate(counts["queued"], counts["running"], done, span)


def human(seconds: float | None) -> str:
    """'2 h 10 min', '45 min', '30 s', '3 d 4 h'; 'unknown' for None."""
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"
