"""Job and run statuses: the lifecycle of one problem's search and of a whole run.

A job goes queued -> running -> done | failed | cancelled; a running job whose worker dies or
shuts down goes back to queued.  A run has no stored status: it is derived from its jobs'.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Stored in `jobs.status` (a CHECK constraint allows exactly these)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED: frozenset[JobStatus] = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})
UNFINISHED: frozenset[JobStatus] = frozenset(JobStatus) - FINISHED


class RunStatus(StrEnum):
    """A run's status as `etsq status` shows it, derived from its jobs' statuses."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def of(cls, counts: dict[JobStatus, int]) -> RunStatus:
        """queued while nothing started, running until every job finished, then the outcome."""
        total = sum(counts.values())
        if counts.get(JobStatus.QUEUED, 0) == total:
            return cls.QUEUED
        if sum(counts.get(s, 0) for s in FINISHED) < total:
            return cls.RUNNING
        for status in (JobStatus.CANCELLED, JobStatus.FAILED):
            if counts.get(status, 0) == total:
                return cls(status.value)
        return cls.CANCELLED if counts.get(JobStatus.CANCELLED) else cls.DONE

    @property
    def active(self) -> bool:
        return self in (RunStatus.QUEUED, RunStatus.RUNNING)
