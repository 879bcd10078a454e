"""Turns as the APIs that want roles to alternate (Anthropic's Messages, Google's Gemini)
build them from chat messages: consecutive messages of one role joined into one turn."""

from __future__ import annotations

from .. import errors


def add_turn(turns: list[dict], role: str, field: str, items: list) -> None:
    """Add a message's items (``field``: ``content`` blocks or ``parts``) as a turn, or to the
    last turn when it has the same role; a message with nothing to say adds nothing."""
    if not items:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1][field].extend(items)
    else:
        turns.append({"role": role, field: items})


def some_turns(turns: list[dict]) -> list[dict]:
    """The turns, or a 400 when no message had anything to answer."""
    if not turns:
        raise errors.invalid_request("Invalid value for 'messages': no message to answer",
                                     "messages")
    return turns
