"""State that outlives the front end: spend counters, the semantic cache, and the
requests routed to human review.

A front end given a state directory keeps three files there:

- ``ledger.jsonl``: the ledger's journal (see ``tiergate.accounting``). At
  start it is replayed and compacted to one usage line per tenant. A
  reservation with no settlement was in flight when the process died: the
  provider may have charged for it, so it counts at its estimate (a cap is
  never passed because of a crash).
- ``semantic.tgcache``: a snapshot of the semantic cache (``SemanticCache.save``),
  written every ``snapshot_interval_s`` and at shutdown, restored at start. Its
  entries are keyed by policy version like the live ones, and by the version of
  the rules for what the caches keep (``engine.CACHE_RULES``), so a restart under
  a new policy, or a newer tiergate, serves nothing stale: the server drops such
  entries as the snapshot loads.
- ``reviews.jsonl``: one line per request the risk policy routed to human review
  (request id, time, tenant, task, risk tags, the tag that routed it, policy
  version, client id; the text only when the policy's ``log.raw_text`` is on),
  written as the request is answered ``pending_review``. It only grows: a review
  system reads it (``tail -F``); archive it while the server is stopped.

A file that cannot be read is moved aside (``*.corrupt-<time>``), never
deleted, and the front end starts without it: a warning, not a crash. One
front end at a time owns a directory (an advisory lock); another one that
finds it taken runs with its state in memory and says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from tiergate._core import ConfigError, FormatError, SemanticCache
from tiergate.accounting import DAY_S, Ledger, Usage

log = logging.getLogger("tiergate.state")

LEDGER = "ledger.jsonl"
CACHE = "semantic.tgcache"
REVIEWS = "reviews.jsonl"


class StateDirBusy(Exception):
    pass


@dataclass
class Replay:
    """What a journal held: today's usage per tenant, and what was odd about it."""

    usage: dict[str, Usage] = field(default_factory=dict)
    lines: int = 0
    bad_lines: list[int] = field(default_factory=list)
    open_at_crash: int = 0


def replay(path: Path, today: int) -> Replay:
    """Today's usage per tenant from the journal at ``path`` (other days are closed)."""
    out = Replay()
    open_: dict[int, tuple[str, float]] = {}
    if not path.exists():
        return out

    def usage(tenant: str) -> Usage:
        return out.usage.setdefault(tenant, Usage(today))

    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            out.lines += 1
            try:
                e = orjson.loads(raw)
                kind, tenant, day = e["e"], str(e["tenant"]), int(e["day"])
                if day != today:
                    continue
                if kind == "usage":
                    u = usage(tenant)
                    u.requests += int(e["requests"])
                    u.escalations += int(e["escalations"])
                    u.spent_usd += float(e["spent_usd"])
                elif kind == "requests":
                    usage(tenant).requests += int(e["n"])
                elif kind == "reserve":
                    usage(tenant).escalations += 1
                    open_[int(e["id"])] = (tenant, float(e["usd"]))
                elif kind == "settle":
                    open_.pop(int(e["id"]), None)
                    usage(tenant).spent_usd += float(e["usd"])
                else:
                    raise ValueError(kind)
            except (ValueError, KeyError, TypeError):  # orjson.JSONDecodeError is a ValueError
                out.bad_lines.append(n)
    for tenant, estimate in open_.values():
        usage(tenant).spent_usd += estimate
    out.open_at_crash = len(open_)
    return out


class Journal:
    """An append-only file of JSON lines (the ledger's journal, the review records).
    One ``write`` per event on an O_APPEND descriptor: a line reaches the kernel
    whole, so a killed process loses none that were written."""

    def __init__(self, path: Path, what: str = "the spend journal"):
        self.path = path
        self.what = what
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.failed = False

    def record(self, event: dict[str, Any]) -> None:
        # A full disk must not fail the request: what is in memory stays right, only
        # what survives a restart suffers, and the log says so (once).
        try:
            os.write(self.fd, orjson.dumps(event) + b"\n")
        except OSError as e:
            if not self.failed:
                log.error("%s: cannot write %s (%s); a restart will lose what follows",
                          self.path, self.what, e)  # fmt: skip
            self.failed = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def compact(path: Path, usage: dict[str, Usage]) -> None:
    """Rewrites the journal as one usage line per tenant, atomically."""
    tmp = path.with_suffix(".tmp-write")
    with tmp.open("wb") as f:
        for tenant, u in sorted(usage.items()):
            line = {"e": "usage", "tenant": tenant, "day": u.day, "requests": u.requests,
                    "escalations": u.escalations, "spent_usd": u.spent_usd}  # fmt: skip
            f.write(orjson.dumps(line) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def set_aside(path: Path, why: str) -> Path:
    """Moves an unreadable file out of the way, keeping it for a human to look at."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, aside)
    log.warning("%s: %s; moved to %s, starting without it", path, why, aside.name)
    return aside


class StateStore:
    """The state directory of one front end: opened at start, saved while serving
    and at shutdown."""

    def __init__(self, directory: Path):
        self.dir = directory
        try:
            # Owner only: the books name tenants, the cache holds embeddings of their texts.
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock: IO[bytes] = (self.dir / "lock").open("wb")
        except OSError as e:  # a config mistake (a file in the way, no permission)
            raise ConfigError(
                f"state directory {self.dir}: {e.strerror or e} (--state-dir none to run without)"
            ) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StateDirBusy(f"{self.dir} is in use by another tiergate front end") from None
        self.journal: Journal | None = None
        self.ledger: Ledger | None = None
        self.reviews: Journal | None = None

    def restore_ledger(self, ledger: Ledger) -> Replay:
        """Loads today's books into ``ledger`` and starts journaling its changes."""
        path = self.dir / LEDGER
        today = int(ledger.clock() // DAY_S)
        found = replay(path, today)
        if found.bad_lines:
            shown = ", ".join(map(str, found.bad_lines[:5]))
            set_aside(path, f"{len(found.bad_lines)} unreadable journal line(s) (line {shown})")
        if found.open_at_crash:
            log.warning(
                "%d escalation(s) were in flight when the last run stopped; "
                "counted as spent at their estimates",
                found.open_at_crash,
            )
        with ledger.lock:
            ledger.usage.update(found.usage)
        compact(path, found.usage)
        self.journal = Journal(path)
        ledger.journal = self.journal
        self.ledger = ledger
        return found

    def open_reviews(self) -> Journal:
        """The file the requests routed to human review are appended to."""
        if self.reviews is None:
            self.reviews = Journal(self.dir / REVIEWS, "the review records")
        return self.reviews

    def restore_cache(self, cache: SemanticCache | None) -> int:
        """Adds the saved semantic-cache entries to ``cache``; how many were still live."""
        path = self.dir / CACHE
        if cache is None or not path.exists():
            return 0
        try:
            return cache.restore(path)
        except FormatError as e:
            set_aside(path, str(e).removeprefix(f"{path}: "))
            return 0

    def save_cache(self, cache: SemanticCache | None) -> int:
        if cache is None:
            return 0
        return cache.save(self.dir / CACHE)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.flush()
            self.ledger.journal = None
        for journal in (self.journal, self.reviews):
            if journal is not None:
                journal.close()
        self._lock.close()  # releases the lock
