"""Per-tenant daily quotas: requests, escalations and spend.

Spend is reserved before an escalation (at the estimated price) and settled
after it with the price the provider reported, so concurrent requests can
never push a tenant past its cap: a reservation that would cross the cap is
refused up front. The ledger is touched only from the event loop (no await
between check and update), and a lock makes it safe from threads too.

With a journal (``tiergate.state``) the books outlive the process: each
reservation is written before the frontier call it pays for and each
settlement as it happens, request counts once a second.

Several front ends (on Ray, one per node) share their escalation and spend books
through ``SharedBooks`` (on Ray, in the Bank deployment): the engine reserves and
settles through a ``Books``, its own ledger's (``LocalBooks``) or the shared ones.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tiergate.policy import Tenant

DAY_S = 86_400.0


class QuotaExceeded(Exception):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Usage:
    day: int
    requests: int = 0
    escalations: int = 0
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    open_reservations: int = 0


@dataclass
class Reservation:
    tenant: str
    day: int
    amount: float
    settled: bool = field(default=False)
    id: int = 0
    # Its key at shared books (the request's id); "" when the front end's own ledger holds it.
    key: str = ""


class Journal(Protocol):
    def record(self, event: dict[str, Any]) -> None: ...


class Ledger:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.usage: dict[str, Usage] = {}
        self.lock = threading.Lock()
        self.journal: Journal | None = None
        self.next_id = 0
        # Requests counted since the last flush, per (tenant, day): a line per
        # request would cost the cheap tiers a write each.
        self.unflushed: Counter[tuple[str, int]] = Counter()

    def flush(self) -> None:
        """Writes the request counts gathered since the last flush to the journal."""
        with self.lock:
            if self.journal is None or not self.unflushed:
                return
            counts, self.unflushed = self.unflushed, Counter()
            for (tenant, day), n in counts.items():
                self.journal.record({"e": "requests", "tenant": tenant, "day": day, "n": n})

    def _today(self, tenant: str) -> Usage:
        day = int(self.clock() // DAY_S)
        u = self.usage.get(tenant)
        if u is None or u.day != day:
            u = self.usage[tenant] = Usage(day)
        return u

    def _retry_after(self) -> float:
        return DAY_S - self.clock() % DAY_S

    def admit(self, tenant: Tenant) -> None:
        """Counts a request, or raises QuotaExceeded when the daily request quota is spent."""
        with self.lock:
            u = self._today(tenant.name)
            cap = tenant.quota.requests_per_day
            if cap is not None and u.requests >= cap:
                raise QuotaExceeded(
                    f"tenant {tenant.name!r} reached its quota of {cap} requests per day",
                    self._retry_after(),
                )
            u.requests += 1
            if self.journal is not None:
                self.unflushed[(tenant.name, u.day)] += 1

    def unadmit(self, tenant: Tenant) -> None:
        """Takes back a request counted by ``admit`` that the server then refused
        for its own reasons (overload): a retry must not cost the tenant twice."""
        with self.lock:
            u = self._today(tenant.name)
            if u.requests > 0:
                u.requests -= 1
                if self.journal is not None:
                    self.unflushed[(tenant.name, u.day)] -= 1

    def reserve_escalation(self, tenant: Tenant, estimate_usd: float) -> Reservation:
        """Reserves one escalation and its estimated cost, or raises QuotaExceeded."""
        with self.lock:
            u = self._today(tenant.name)
            q = tenant.quota
            if q.escalations_per_day is not None and u.escalations >= q.escalations_per_day:
                raise QuotaExceeded(
                    f"tenant {tenant.name!r} reached its quota of {q.escalations_per_day} "
                    "escalations per day",
                    self._retry_after(),
                )
            committed = u.spent_usd + u.reserved_usd + estimate_usd
            if q.spend_per_day_usd is not None and committed > q.spend_per_day_usd:
                raise QuotaExceeded(
                    f"tenant {tenant.name!r} would pass its spend cap of "
                    f"${q.spend_per_day_usd:.4f} per day",
                    self._retry_after(),
                )
            u.escalations += 1
            u.reserved_usd += estimate_usd
            u.open_reservations += 1
            self.next_id += 1
            r = Reservation(tenant.name, u.day, estimate_usd, id=self.next_id)
            if self.journal is not None:
                self.journal.record(
                    {"e": "reserve", "id": r.id, "tenant": r.tenant, "day": r.day, "usd": r.amount}
                )
            return r

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Replaces the reserved amount with the actual cost (0 releases a failed call)."""
        with self.lock:
            if reservation.settled:
                return
            reservation.settled = True
            if self.journal is not None:
                self.journal.record(
                    {"e": "settle", "id": reservation.id, "tenant": reservation.tenant,
                     "day": reservation.day, "usd": actual_usd}
                )  # fmt: skip
            u = self.usage.get(reservation.tenant)
            if u is None or u.day != reservation.day:
                return  # the day rolled over; yesterday's books are closed
            u.open_reservations -= 1
            # With none open, nothing is reserved: exactly 0, not float residue.
            u.reserved_usd = max(0.0, u.reserved_usd - reservation.amount)
            if u.open_reservations == 0:
                u.reserved_usd = 0.0
            u.spent_usd += actual_usd

    def snapshot(self, tenant: str) -> Usage:
        with self.lock:
            u = self._today(tenant)
            return Usage(
                u.day, u.requests, u.escalations, u.spent_usd, u.reserved_usd, u.open_reservations
            )


class BooksUnavailable(Exception):
    """The shared books did not answer: no escalation can be paid for."""


class Books(Protocol):
    """Where the engine reserves and settles escalations: the front end's own ledger
    (LocalBooks), or books shared by every front end of a cluster (on Ray,
    tiergate.ray_app.RemoteBooks). Reserving raises QuotaExceeded or BooksUnavailable,
    within ``timeout_s``; settling returns at once (shared books settle in the
    background) and a second settlement of a reservation is a no-op."""

    async def reserve_escalation(
        self, tenant: Tenant, estimate_usd: float, request_id: str, timeout_s: float | None
    ) -> Reservation: ...

    def settle(self, reservation: Reservation, actual_usd: float) -> None: ...


class LocalBooks:
    """A front end's own ledger as its books: caps hold per front end."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    async def reserve_escalation(
        self, tenant: Tenant, estimate_usd: float, request_id: str, timeout_s: float | None
    ) -> Reservation:
        return self.ledger.reserve_escalation(tenant, estimate_usd)

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        self.ledger.settle(reservation, actual_usd)


class SharedBooks:
    """Escalation and spend books that several front ends reserve and settle against
    (on Ray: the Bank deployment's one replica), so that a tenant's caps hold across
    them. A reservation is known by a key its front end chose, the request's id
    (unique across front ends and restarts): the front end can release one whose
    answer it never got."""

    RELEASED_KEPT = 10_000

    def __init__(self, ledger: Ledger | None = None):
        self.ledger = ledger or Ledger()
        self.open: dict[str, Reservation] = {}
        # Keys settled before their reservation arrived (a front end that gave up on
        # it releases it at once): that reservation, when it arrives, is refused.
        self.released: OrderedDict[str, None] = OrderedDict()
        self.day = -1
        self.lock = threading.Lock()  # each call whole: a release may race its reservation

    def reserve(self, tenant: Tenant, estimate_usd: float, key: str) -> dict[str, Any]:
        """{"ok": True, "day"} or {"ok": False, "message", "retry_after_s"} (plain
        values: an exception would have to survive pickling across processes)."""
        with self.lock:
            if key in self.released or key in self.open:
                return {"ok": False, "message": f"reservation {key!r} was released or exists",
                        "retry_after_s": 0.0}  # fmt: skip
            day = int(self.ledger.clock() // DAY_S)
            if day != self.day:  # a new day: yesterday's books are closed, and so is what
                self.day = day  # was left open in them (a settlement that never came)
                self.open = {k: r for k, r in self.open.items() if r.day >= day}
            try:
                r = self.ledger.reserve_escalation(tenant, estimate_usd)
            except QuotaExceeded as e:
                return {"ok": False, "message": str(e), "retry_after_s": e.retry_after_s}
            self.open[key] = r
            return {"ok": True, "day": r.day}

    def settle(self, key: str, actual_usd: float) -> bool:
        """Settles the reservation under ``key``; False when none is open (settled
        already, made before a restart, or not arrived yet: then it never will be)."""
        with self.lock:
            r = self.open.pop(key, None)
            if r is None:
                self.released[key] = None
                while len(self.released) > self.RELEASED_KEPT:
                    self.released.popitem(last=False)
                return False
            self.ledger.settle(r, actual_usd)
            return True
