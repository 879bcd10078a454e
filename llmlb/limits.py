"""Per-key limits (QT-1, QT-2): what a key may use — requests per minute, tokens per minute,
requests at once, tokens per day and per month, the models it may call — what they mean,
and their windows, verdicts and headers (``limiter.py`` enforces them). No Flask here.

Windows: a minute starts with the first request after the last minute ended (so 30 requests
sent at once fall in one window, never split across a clock minute); a day and a month are
UTC calendar periods. Each window is one counter row per key in the state
(``state/quotas.py``), counted in one statement that also starts a new window when the last
has ended. Requests count when they arrive (refused ones too: a key hammering past its limit
waits for the window, as with OpenAI); tokens count when the answer's ``usage`` is known, so
a request that would start past a token limit is refused and one already running finishes.

Requests at once are leases, and a key far from its limits spends blocks of its budget
reserved ahead: ``limiter.py`` enforces what this module defines.

A key without limits costs nothing: its limits come with the key's row (read through the
per-worker key cache), and ``Principal.limits`` is then None — no state round trip.
"""

from __future__ import annotations

import calendar
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from .state.accounts import LIMIT_COLUMNS

if TYPE_CHECKING:
    from .state.quotas import Quotas

MINUTE = 60.0
#: the numeric limits: field -> (counter span, what it counts, what people call it)
NUMBERS = {
    "rpm": ("rpm", "requests", "requests per minute"),
    "tpm": ("tpm", "tokens", "tokens per minute"),
    "daily_tokens": ("day", "tokens", "tokens per day"),
    "monthly_tokens": ("month", "tokens", "tokens per month"),
    "max_concurrent": ("concurrent", "requests", "requests at once"),
}
#: (limit field, counter span) of the token limits, in the order the headers prefer them
TOKEN_LIMITS = tuple((name, NUMBERS[name][0]) for name in ("tpm", "daily_tokens",
                                                           "monthly_tokens"))
TOKEN_SPANS = tuple(span for _, span in TOKEN_LIMITS)
_MAX = 2**62


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    models: tuple[str, ...] | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    @functools.cached_property  # asked on every request of a limited key
    def counted(self) -> bool:
        """Whether a request needs the state (anything but the model list)."""
        return any(getattr(self, name) is not None for name in NUMBERS)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in NUMBERS}
        out["models"] = list(self.models) if self.models is not None else None
        return out

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Limits:
        models = row.get("models")
        return cls(**{name: row.get(name) for name in NUMBERS},
                   models=tuple(models.split(",")) if models else None)

    def columns(self) -> tuple:
        """The values of the key row's ``LIMIT_COLUMNS``."""
        models = ",".join(self.models) if self.models is not None else None
        return tuple(models if c == "models" else getattr(self, c) for c in LIMIT_COLUMNS)


def parse_limits(given: Mapping[str, Any], base: Limits | None = None) -> Limits:
    """``base`` changed by ``given`` (absent fields kept; null, 0 or "" removes a limit);
    ValueError naming the field when a value is not a whole number >= 1 or a list of model
    ids."""
    values = {f.name: getattr(base or Limits(), f.name) for f in fields(Limits)}
    for name in NUMBERS:
        if name not in given:
            continue
        value = given[name]
        if value in (None, 0, ""):
            values[name] = None
            continue
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _MAX:
            raise ValueError(f"{name} must be a whole number of at least 1 (or null for no "
                             f"limit); got {value!r}")
        values[name] = value
    if "models" in given:
        values["models"] = parse_models(given["models"])
    return Limits(**values)


def parse_models(value: Any) -> tuple[str, ...] | None:
    if value is None or value == "" or value == []:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(m, str) for m in items):
        raise ValueError(f"models must be a list of model ids (or null for any); got {value!r}")
    cleaned = tuple(sorted({m.strip().lower() for m in items if m.strip()}))
    if any("," in m for m in cleaned):
        raise ValueError("a model id in models may not hold a comma")
    return cleaned or None


# --- window arithmetic (pure) ------------------------------------------------------------------

def window(span: str, now: float) -> tuple[float, float]:
    """(start, end) of the window a count at ``now`` opens: a minute from now, or the UTC
    day or month holding now."""
    if span in ("rpm", "tpm"):
        return now, now + MINUTE
    day = math.floor(now / 86400) * 86400
    if span == "day":
        return day, day + 86400
    moment = datetime.fromtimestamp(now, UTC)
    start = calendar.timegm((moment.year, moment.month, 1, 0, 0, 0))
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return float(start), float(calendar.timegm((year, month, 1, 0, 0, 0)))


NO_LIMITS = Limits()


def reset_text(seconds: float) -> str:
    """A wait as OpenAI's ``x-ratelimit-reset-*`` headers write it: ``20ms``, ``6s``,
    ``1m30s``, ``2h0m5s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    if whole < 60:  # the minute's windows: every answer of a limited key
        return f"{whole}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s"


class Counted(NamedTuple):
    """A window's counter as the state returned it (a tuple: made per request)."""

    used: int
    ends: float


def verdict(limits: Limits, counted: Mapping[str, Counted], now: float,
            ) -> tuple[str | None, float, list[tuple[str, str]]]:
    """(the limit field a new request would break, or None; seconds until it resets; the
    ``x-ratelimit-*`` headers). ``counted`` already includes this request in ``rpm``."""
    broken, wait = None, 0.0
    for name in ("rpm", "tpm", "daily_tokens", "monthly_tokens"):
        limit = getattr(limits, name)
        span = NUMBERS[name][0]
        if limit is None or span not in counted:
            continue
        c = counted[span]
        over = c.used > limit if span == "rpm" else c.used >= limit
        if over and broken is None:
            broken, wait = name, max(0.0, c.ends - now)
    return broken, wait, headers(limits, counted, now)


def highest_counts(limits: Limits) -> dict[str, int]:
    """Per counted window, the highest count (this request included in ``rpm``) that still
    admits a request: what ``verdict`` decides, for a check the state makes in one go."""
    return {NUMBERS[name][0]: limit if name == "rpm" else limit - 1
            for name in ("rpm", "tpm", "daily_tokens", "monthly_tokens")
            if (limit := getattr(limits, name)) is not None}


def headers(limits: Limits, counted: Mapping[str, Counted], now: float) -> list[tuple[str, str]]:
    """OpenAI's rate-limit headers: requests from ``rpm``; tokens from ``tpm``, else the
    daily, else the monthly budget."""
    out: list[tuple[str, str]] = []
    if limits.rpm is not None and (c := counted.get("rpm")) is not None:
        out += (("x-ratelimit-limit-requests", str(limits.rpm)),
                ("x-ratelimit-remaining-requests", str(max(0, limits.rpm - c.used))),
                ("x-ratelimit-reset-requests", reset_text(c.ends - now)))
    for name, span in TOKEN_LIMITS:
        limit = getattr(limits, name)
        if limit is not None and (c := counted.get(span)) is not None:
            out += (("x-ratelimit-limit-tokens", str(limit)),
                    ("x-ratelimit-remaining-tokens", str(max(0, limit - c.used))),
                    ("x-ratelimit-reset-tokens", reset_text(c.ends - now)))
            break
    return out


@dataclass(frozen=True)
class Quota:
    """Who is limited: the key's id and name, and its limits."""

    key_id: int
    key_name: str
    limits: Limits



def current_use(quotas: Quotas, key_ids: list[int], now: float) -> dict[int, dict[str, int]]:
    """What each key has used of its limits now: requests this minute, tokens this minute,
    today and this month, requests running."""
    out: dict[int, dict[str, int]] = {}
    for key_id, spans in quotas.current(key_ids, now).items():
        use = {name: spans.get(span, 0) for name, (span, _, _) in NUMBERS.items()}
        out[key_id] = use
    return out
