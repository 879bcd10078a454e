"""What a node sends to join the balancer and keep its place, checked where it enters: its
registration (``POST /v0/nodes``) and heartbeats (``POST /v0/nodes/{name}/heartbeat``). Each
carries the node's own secret, which proves that the name is the node's (SC-7), and its
report, typed (``reports``); a field that is wrong is a 400 naming it."""

from __future__ import annotations

from dataclasses import dataclass

from .. import errors
from ..config import NODE_NAME
from ..urls import BadURL, check_url
from .reports import NodeReport, ReportError


@dataclass(frozen=True)
class Registration:
    """What a node sends to register, checked."""

    name: str
    url: str
    secret: str
    report: NodeReport


def registration(body: dict) -> Registration:
    """A node's registration, or a 400 naming the field."""
    name, url = body.get("name"), body.get("url")
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        raise errors.invalid_request("Invalid value for 'name': 1-64 letters, digits, '.', '_' "
                                     "or '-', starting with a letter or digit", "name")
    try:
        url = check_url(url)
    except BadURL as exc:
        raise errors.invalid_request(f"Invalid value for 'url': the node's address {exc}",
                                     "url") from None
    return Registration(name, url, node_secret(body), node_report(body))


def node_secret(body: dict) -> str:
    """The secret that proves a registration or heartbeat comes from the node that owns
    the name (the one it made, kept in its home)."""
    from .. import errors

    secret = body.get("secret")
    if secret is None:
        raise errors.missing_parameter("secret", " (the node's own secret: it proves the "
                                       "name is this node's; llmlb nodes send it themselves)")
    if not isinstance(secret, str) or not 16 <= len(secret) <= 200:
        raise errors.invalid_request("Invalid value for 'secret': 16 to 200 characters",
                                     "secret")
    return secret


def node_report(body: dict) -> NodeReport:
    """The body's ``report``, typed, or a 400 naming the field that is wrong."""
    try:
        return NodeReport.parse(body.get("report", {}))
    except ReportError as exc:
        raise errors.invalid_request(f"Invalid value for '{exc.field}': it {exc.why}",
                                     exc.field) from None
