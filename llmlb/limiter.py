"""Enforcing per-key limits (QT-2): each request of a limited key admitted against the
shared counters (``state/quotas.py``), exact across every worker and balancer sharing a state;
what the limits are and mean is ``limits.py``. No Flask here.

Requests at once are leases: a lease row per request, given back when the answer ends
(streams and clients that leave included); renewed by this process while the request runs,
so a process that dies holding one frees it ``LLMLB_KEY_LEASE_SECONDS`` later.

A key far from all its limits does not pay a check per request: a check reserves a block of
its budget that the process then spends locally (``Limiter``), so the state still never
admits more than a limit, and near one every request is checked on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import errors
from .limits import (
    NUMBERS,
    TOKEN_LIMITS,
    TOKEN_SPANS,
    Counted,
    Limits,
    Quota,
    headers,
    highest_counts,
    verdict,
    window,
)

if TYPE_CHECKING:
    from .state.quotas import Quotas

log = logging.getLogger(__name__)

#: A block's share of what a key has left, and the largest blocks (``block``).
BLOCK_SHARE = 64
MOST_REQUESTS = 64
MOST_SLOTS = 16
#: How long a process spends a block before asking again: the token counts it admits against
#: are never older, and the tokens it counted are written at least this often.
ALLOWANCE_SECONDS = 1.0
#: How long a request waits for another's check of the same key before looking again.
CHECK_WAIT_SECONDS = 5.0


def block(limit: int | None, used: int | None, most: int) -> int:
    """How much of a limit one process may reserve at once: a ``BLOCK_SHARE``-th of what is
    left, at most ``most``; 1 (a request at a time, exact as a single check) near the limit,
    or where the count is not known yet."""
    if limit is None or used is None:
        return 1
    return max(1, min(most, (limit - used) // BLOCK_SHARE))


def token_spans(limits: Limits, tokens: int, now: float,
                ) -> list[tuple[str, float, float, int]]:
    """``tokens`` to add to each of the key's token windows (none when there are none)."""
    if tokens <= 0:
        return []
    return [(span, *window(span, now), tokens) for name, span in TOKEN_LIMITS
            if getattr(limits, name) is not None]


def token_room(limits: Limits, counted: Mapping[str, Counted], now: float) -> float:
    """How many more tokens keep every token window under half its limit (inf without
    token limits; 0 or less: none)."""
    room = float("inf")
    for name, span in TOKEN_LIMITS:
        limit = getattr(limits, name)
        if limit is None:
            continue
        c = counted.get(span)
        used = c.used if c is not None and c.ends > now else 0
        room = min(room, limit / 2 - used)
    return room


@dataclass(eq=False)
class Allowance:
    """A block of a key's budget that this process reserved in the shared state (so that no
    one else can spend it) and spends request by request without asking: requests of the
    current minute, slots (lease rows), while every token window is under half its limit."""

    key_id: int
    key_name: str
    limits: Limits
    until: float  # asked again after this
    rpm_ends: float = 0.0  # the minute the requests belong to
    requests: int = 0  # requests left of the block
    rpm_used: int = 0  # the minute's count when reserved, the block included
    tokens: dict[str, Counted] = field(default_factory=dict)  # token windows as seen then
    token_room: float = 0.0  # tokens to spend before a token window is half used
    pending: int = 0  # tokens of requests that ended here, not written yet
    leases: list[int] = field(default_factory=list)  # the slots reserved
    running: int = 0  # requests running on them
    used_at: float = 0.0
    written_at: float = 0.0
    retired: bool = False  # given back: its running requests end one at a time

    def admits(self, limits: Limits, now: float) -> bool:
        if self.retired or now >= self.until or (limits is not self.limits
                                                   and limits != self.limits):
            return False
        if limits.rpm is not None and (self.requests < 1 or now >= self.rpm_ends):
            return False
        if limits.max_concurrent is not None and self.running >= len(self.leases):
            return False
        # (a window that ended since only has more room)
        return self.pending < self.token_room

    def take(self, now: float) -> None:
        if self.limits.rpm is not None:
            self.requests -= 1
        self.running += 1
        self.used_at = now

    def counts(self) -> dict[str, Counted]:
        """The windows the rate-limit headers tell of (``limits.headers``: the minute's
        requests, the first token window) as this process knows them: requests actually
        admitted, tokens counted here included."""
        out = {}
        for span in TOKEN_SPANS:
            if (c := self.tokens.get(span)) is not None:
                out[span] = Counted(c.used + self.pending, c.ends)
                break
        if self.limits.rpm is not None:
            out["rpm"] = Counted(self.rpm_used - self.requests, self.rpm_ends)
        return out


@dataclass
class Ticket:
    """An admitted request of a limited key: the headers its answer carries, and what it
    gives back when it ends (``finish``, once): its own lease and tokens, or its place in
    the process's ``Allowance``."""

    limiter: Limiter | None
    quota: Quota
    headers: list[tuple[str, str]] = field(default_factory=list)
    lease: int | None = None
    allowance: Allowance | None = None

    def finish(self, tokens: int) -> None:
        limiter, self.limiter = self.limiter, None
        if limiter is not None:
            limiter.finish(self, tokens)


@dataclass
class _Return:
    """What the background pass gives back or writes for one key."""

    key_id: int
    key_name: str
    tokens: list[tuple[str, float, float, int]]
    requests: tuple[float, int] | None
    leases: list[int]


class Limiter:
    """Admits the requests of limited keys against the shared counters.

    Near a limit (or the first time a process sees a key) each request is one check in the
    state, exact across workers and balancers. Far from every limit — a block would be at
    least 2 requests and 2 slots, and every token window under half its limit — the check
    also reserves a block (``block``: a 64th of what is left, at most 64 requests and 16
    slots), which this process then spends without asking, for at most
    ``ALLOWANCE_SECONDS`` (while one request reserves the next block, the key's other
    requests in this process wait for it); the tokens of its requests are written with the
    next check or by the background pass (at least every ``ALLOWANCE_SECONDS``), which also
    gives back what a process stopped using. The state never admits more than a limit (a
    block is counted before it is spent); what a block costs: the minute's count and the
    running count include the unspent rest of each process's block (at most 1/64 of what
    was left) until it is given back (a second after its last use; a process that dies loses
    its requests until the minute ends, its slots until their leases expire), and a token
    limit is checked against counts up to a second old while under half of it."""

    def __init__(self, quotas: Quotas, lease_seconds: float) -> None:
        self.quotas, self.lease_seconds = quotas, lease_seconds
        self._leases: set[int] = set()  # held by requests admitted one by one: renewed
        self._allowances: dict[int, Allowance] = {}
        self._retired: list[Allowance] = []  # given back, requests still running on them
        # per key, as the last check found it: (the minute's count, the running count,
        # whether near a limit: then the next check asks for this request alone)
        self._seen: dict[int, tuple[int | None, int | None, bool]] = {}
        self._checking: dict[int, threading.Event] = {}  # per key: a block being reserved
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def admit(self, quota: Quota, model_id: str) -> Ticket:
        """The request's ticket, or the 403/429 that refuses it."""
        limits = quota.limits
        if limits.models is not None and model_id.lower() not in limits.models:
            raise errors.model_not_permitted(model_id, quota.key_name, limits.models)
        if not limits.counted:
            return Ticket(None, quota)
        while True:
            now = time.time()
            with self._lock:
                held = self._allowances.get(quota.key_id)
                if held is not None and held.admits(limits, now):
                    held.take(now)
                    return Ticket(self, quota, headers(limits, held.counts(), now),
                                  allowance=held)
                seen_requests, seen_running, near = self._seen.get(quota.key_id,
                                                                   (None, None, False))
                checking = self._checking.get(quota.key_id)
                if near or checking is None:
                    pending = spare = left = 0
                    if held is not None:  # its tokens go with this check
                        pending, held.pending, held.written_at = held.pending, 0, now
                        if not held.retired and held.limits == limits:
                            spare = len(held.leases) - held.running
                            left = held.requests if now < held.rpm_ends else 0
                    mine = None
                    if not near:
                        mine = self._checking[quota.key_id] = threading.Event()
                    break
            # Far from the limits, one check per key at a time: the requests that find the
            # block spent while another one refills it wait for that block instead of each
            # reserving (and then giving back) one of their own.
            checking.wait(CHECK_WAIT_SECONDS)
        # Only what the allowance lacks: requests while it has none of this minute left,
        # slots (0: only its other limits asked for) while it has none free.
        want = 1 if near or left > 0 else block(limits.rpm, seen_requests, MOST_REQUESTS)
        slots = 0 if spare > 0 else 1 if near else block(limits.max_concurrent, seen_running,
                                                         MOST_SLOTS)
        try:
            return self._check(quota, now, want, slots, pending, held, left)
        finally:
            if mine is not None:
                with self._lock:
                    if self._checking.get(quota.key_id) is mine:
                        del self._checking[quota.key_id]
                mine.set()

    def _check(self, quota: Quota, now: float, want: int, slots: int, pending: int,
               held: Allowance | None, left: int = 0) -> Ticket:
        limits = quota.limits
        spans = [(span, *window(span, now), want if span == "rpm" else pending)
                 for name, span in (("rpm", "rpm"), *TOKEN_LIMITS)
                 if getattr(limits, name) is not None]
        expires = now + self.lease_seconds
        most = highest_counts(limits)
        try:
            found, leases, running = self.quotas.admit(
                quota.key_id, spans, limits.max_concurrent if slots else None, expires, most,
                max(slots, 1))
        except errors.StateUnavailable:
            if pending and held is not None:  # not written: counted with the next check
                with self._lock:
                    held.pending += pending
            raise
        counted = {s: Counted(*v) for s, v in found.items()}
        rpm = counted.get("rpm")
        if want > 1 and rpm is not None and rpm.used > most["rpm"]:
            # The block did not fit (others spent what was left): this request alone.
            self.quotas.give_back(quota.key_id, [], (rpm.ends, want - 1), leases)
            counted["rpm"] = rpm = Counted(rpm.used - (want - 1), rpm.ends)
            want, leases = 1, []
            if limits.max_concurrent is not None and rpm.used <= most["rpm"]:
                leases, running = self.quotas.take_lease(quota.key_id, limits.max_concurrent,
                                                         expires)
        elif limits.max_concurrent is not None and not leases and slots > 1 \
                and all(c.used <= most[s] for s, c in counted.items()):
            leases, running = self.quotas.take_lease(quota.key_id, limits.max_concurrent,
                                                     expires)
        tokens_far = token_room(limits, counted, now) > 0
        with self._lock:
            if running is None:
                running = self._seen.get(quota.key_id, (None, None, False))[1]
            room = ((limits.rpm is None or block(limits.rpm, rpm and rpm.used, 2) > 1)
                    and (limits.max_concurrent is None
                         or block(limits.max_concurrent, running, 2) > 1)
                    and tokens_far)
            self._seen[quota.key_id] = (rpm and rpm.used, running, not room)
        # the requests of the block beyond this one (the minute's end, how many)
        rest = (rpm.ends, want - 1) if rpm is not None and want > 1 else None
        broken, wait, sent = verdict(limits, counted, now)
        if broken is not None:
            if leases or rest:
                self.quotas.give_back(quota.key_id, [], rest, leases)
            # A block reserved when the key was far (spent by requests whose tokens came in
            # since) must not admit anything more: from here on each request is checked.
            with self._lock:
                returns = self._retire_key(quota.key_id)
            self._give_back(returns)
            raise errors.rate_limit_exceeded(quota.key_name, NUMBERS[broken][2], broken,
                                             getattr(limits, broken), wait, sent)
        far = ((limits.rpm is None or want > 1 or left > 0)
               and (limits.max_concurrent is None or len(leases) > 1 or slots == 0)
               and tokens_far)
        if limits.max_concurrent is not None and not leases and not (far and slots == 0):
            leases = [self._own_lease(quota, now, expires, sent, rest)]
        if not far:
            extra = leases[1:]
            if rest or extra:  # near a limit after all: only this request's share kept
                self.quotas.give_back(quota.key_id, [], rest, extra)
            lease = leases[0] if leases else None
            with self._lock:
                returns = self._retire_key(quota.key_id)
                if lease is not None:
                    self._leases.add(lease)
                    self._start()
            self._give_back(returns)
            return Ticket(self, quota, sent, lease)
        with self._lock:
            held = self._allowances.get(quota.key_id)
            if held is None or held.retired or held.limits != limits:
                returns = [self._retire(held)] if held is not None else []
                held = Allowance(quota.key_id, quota.key_name, limits, now)
                self._allowances[quota.key_id] = held
            else:
                returns = []
            held.until = now + ALLOWANCE_SECONDS
            if rpm is not None:
                if held.rpm_ends != rpm.ends:  # a new minute: what was left is gone with it
                    held.requests = 0
                held.rpm_ends, held.requests = rpm.ends, held.requests + want
                held.rpm_used = rpm.used
            held.tokens = {s: c for s, c in counted.items() if s != "rpm"}
            held.token_room = token_room(limits, counted, now)
            held.leases += leases
            held.take(now)
            short = limits.max_concurrent is not None and held.running > len(held.leases)
            # Requests checking together each brought a block: one block's worth is kept.
            keep = held.running + MOST_SLOTS
            spare_leases, held.leases = held.leases[keep:], held.leases[:keep]
            spare_requests = max(0, held.requests - MOST_REQUESTS)
            held.requests -= spare_requests
            if spare_leases or spare_requests:
                returns.append(_Return(held.key_id, held.key_name, [],
                                       (held.rpm_ends, spare_requests) if spare_requests
                                       else None, spare_leases))
            self._start()
        self._give_back(returns)
        if short:  # another request took the free slot meanwhile: one of its own
            try:
                lease = self._own_lease(quota, now, expires, sent, None)
            except errors.APIError:
                with self._lock:
                    held.running -= 1
                raise
            with self._lock:
                held.leases.append(lease)
        return Ticket(self, quota, headers(limits, held.counts(), now), allowance=held)

    def _own_lease(self, quota: Quota, now: float, expires: float, sent: list,
                   requests: tuple[float, int] | None) -> int:
        """A slot for this request alone (after sweeping the leases of dead processes),
        or the 429 that says the key has none left (``requests``: the rest of a block of
        requests taken with the check, given back then)."""
        limits = quota.limits
        leases, _ = self.quotas.take_lease(quota.key_id, limits.max_concurrent, expires)
        if not leases and self.quotas.sweep_leases(quota.key_id, now):
            leases, _ = self.quotas.take_lease(quota.key_id, limits.max_concurrent, expires)
        if not leases:
            if requests is not None:
                self.quotas.give_back(quota.key_id, [], requests, [])
            raise errors.rate_limit_exceeded(quota.key_name, "requests at once",
                                             "max_concurrent", limits.max_concurrent, 1.0,
                                             sent)
        return leases[0]

    def finish(self, ticket: Ticket, tokens: int) -> None:
        """The answer ended: its tokens counted, its lease given back, together (best
        effort: the answer is already out; a lease left behind expires). A request spent
        from an allowance only counts there, unless that was given back meanwhile."""
        limits = ticket.quota.limits
        now = time.time()
        lease = ticket.lease
        held = ticket.allowance
        if held is not None:
            with self._lock:
                held.running -= 1
                held.pending += max(tokens, 0)
                if not held.retired:
                    return
                tokens, held.pending = held.pending, 0
                lease = held.leases.pop() if held.leases else None
                if held.running <= 0 and held in self._retired:
                    self._retired.remove(held)
        spans = token_spans(limits, tokens, now)
        if lease is not None:
            with self._lock:
                self._leases.discard(lease)
        if not spans and lease is None:
            return
        try:
            self.quotas.settle(ticket.quota.key_id, spans, lease)
        except errors.StateUnavailable as exc:
            log.warning("Key %s: usage not counted, lease left to expire (%s)",
                        ticket.quota.key_name, exc)

    def close(self) -> None:
        """The process ends: every block it holds given back."""
        with self._lock:
            returns = [self._retire(held) for held in list(self._allowances.values())]
        self._give_back(returns)

    # --- in the background -------------------------------------------------------------------

    def _retire_key(self, key_id: int) -> list[_Return]:
        """(Under the lock.) The key's block, if it holds one, retired (``_retire``)."""
        held = self._allowances.get(key_id)
        return [self._retire(held)] if held is not None else []

    def _retire(self, held: Allowance) -> _Return:
        """(Under the lock.) Stop spending ``held``; what goes back now: the requests left,
        the slots not running, the tokens counted. Its running requests give back their
        slots as they end."""
        if self._allowances.get(held.key_id) is held:
            del self._allowances[held.key_id]
        held.retired = True
        spare, held.leases = held.leases[held.running:], held.leases[:held.running]
        pending, held.pending = held.pending, 0
        requests, held.requests = held.requests, 0
        if held.running > 0:
            self._retired.append(held)
        return _Return(held.key_id, held.key_name, token_spans(held.limits, pending, time.time()),
                       (held.rpm_ends, requests) if requests > 0 else None, spare)

    def _give_back(self, returns: list[_Return]) -> None:
        for r in returns:
            if not (r.tokens or r.requests or r.leases):
                continue
            try:
                self.quotas.give_back(r.key_id, r.tokens, r.requests, r.leases)
            except errors.StateUnavailable as exc:
                log.warning("Key %s: a reserved block not given back, left to expire (%s)",
                            r.key_name, exc)

    def _start(self) -> None:
        """(Under the lock.) The background pass, once."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, daemon=True,
                                            name="llmlb-key-limits")
            self._worker.start()

    def _run(self) -> None:
        renewed = time.monotonic()
        while True:
            time.sleep(ALLOWANCE_SECONDS / 2)
            try:
                self._give_back(self._pass(time.time()))
            except Exception:  # noqa: BLE001 - the pass goes on next time
                log.exception("Key limits: the background pass failed")
            if time.monotonic() - renewed >= self.lease_seconds / 3:
                renewed = time.monotonic()
                with self._lock:
                    held = [*self._leases, *(lease for a in (*self._allowances.values(),
                                                              *self._retired)
                                             for lease in a.leases)]
                if held:
                    try:
                        self.quotas.renew_leases(held, time.time() + self.lease_seconds)
                    except errors.StateUnavailable as exc:
                        log.warning("Key leases not renewed: %s", exc)

    def _pass(self, now: float) -> list[_Return]:
        """What to give back (allowances unused for ``ALLOWANCE_SECONDS``) and write (tokens
        counted here for longer than half of it)."""
        out: list[_Return] = []
        with self._lock:
            for key_id, held in list(self._allowances.items()):
                if held.running <= 0 and now - held.used_at >= ALLOWANCE_SECONDS:
                    out.append(self._retire(held))
                elif held.pending and now - held.written_at >= ALLOWANCE_SECONDS / 2:
                    out.append(_Return(key_id, held.key_name,
                                       token_spans(held.limits, held.pending, now), None, []))
                    held.pending, held.written_at = 0, now
        return out
