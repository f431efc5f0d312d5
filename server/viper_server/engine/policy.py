"""Who runs next: the scheduling policies of a StepScheduler.

Between steps the scheduler orders the runnable requests by the policy, takes the first as the lead, and
fills the step's batch with the other requests whose next step can share the lead's forward pass (in the
same order, up to the batch bound). Waiting requests are admitted to the running set in the same order.

- `fair` (default): the user served longest ago goes first (round robin between users: a user served in
  the last step waits for every user not served since); between the requests of equally-served users, the
  kind of work served longest ago (an extraction and a score take turns); then the request served longest
  ago (a user's own requests take turns too, so they can meet in one batch); then arrival order. One user's
  many requests never starve others: a newcomer's first step comes before that user's next one.
- `kinds`: the kind of work served longest ago first, then the user, then the request served longest ago,
  then arrival order: each kind gets an equal share of the steps however many users ask for the other kinds.
- `fifo`: arrival order (the oldest request leads every step, others still join its batch); for comparison.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

POLICY_NAMES = ("fair", "kinds", "fifo")


class Scheduled(Protocol):
    """What the policy reads of a request."""

    kind: str
    user: str
    seq: int  # arrival order at this scheduler
    last_served: int  # the policy's step count when it was last served; -1 before its first step


@dataclass
class SchedulingPolicy:
    """Orders requests by when their user and their kind of work were last served (a step counter)."""

    name: str = "fair"
    _clock: int = field(default=0, init=False)
    _user_served: dict[str, int] = field(default_factory=dict, init=False)
    _kind_served: dict[str, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.name not in POLICY_NAMES:
            raise ValueError(f"unknown scheduling policy {self.name!r} (choose from {', '.join(POLICY_NAMES)})")

    def priority(self, request: Scheduled) -> tuple[int, ...]:
        """Sort key: the smallest goes first. Never-served users and kinds count as served at -1."""
        user = self._user_served.get(request.user, -1)
        kind = self._kind_served.get(request.kind, -1)
        if self.name == "fair":
            return (user, kind, request.last_served, request.seq)
        if self.name == "kinds":
            return (kind, user, request.last_served, request.seq)
        return (request.seq,)

    def order(self, requests: Iterable[Scheduled]) -> list[Scheduled]:
        return sorted(requests, key=self.priority)

    def served(self, requests: Iterable[Scheduled]) -> None:
        """Records one step that served requests (their users and kinds are now the most recently served)."""
        self._clock += 1
        for request in requests:
            request.last_served = self._clock
            self._user_served[request.user] = self._clock
            self._kind_served[request.kind] = self._clock

    def forget(self, user: str) -> None:
        """Drops the bookkeeping of a user with nothing left at this scheduler (bounds its memory)."""
        self._user_served.pop(user, None)
