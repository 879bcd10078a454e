"""One event, one log line: text that comes from clients (URL-decoded paths, headers, model
names) is escaped before it is written, so that a CR/LF or NUL in a request cannot start a
forged line in the log, and terminal escape sequences do not reach an operator's terminal.

The escaping is nginx's: ``"``, ``\\``, control characters and bytes from 0x7f up become
``\\xHH``. gunicorn's access log gets it through ``gunicorn_worker.AccessLogger`` (its
``logger_class``), llmlb's own log through ``SafeFormatter``.
"""

from __future__ import annotations

import logging
import re

_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f-\U0010ffff]')
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _hex(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return "".join(f"\\x{b:02x}" for b in char.encode("utf-8", "surrogatepass"))


def escape(text: str) -> str:
    """``text`` with every character that could break or fake a log line escaped."""
    return _UNSAFE.sub(_hex, text) if _UNSAFE.search(text) else text


def escape_controls(text: str) -> str:
    """Only control characters escaped (a log message of llmlb's own, where quotes and
    non-ASCII names are fine and read better as they are)."""
    return _CONTROLS.sub(_hex, text) if _CONTROLS.search(text) else text



class SafeFormatter(logging.Formatter):
    """A formatter whose messages stay on their line (a traceback, added after, keeps its
    own lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_controls(record.message)
        return super().formatMessage(record)
