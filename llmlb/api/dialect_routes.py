"""``/v1/responses`` and ``/v1/messages``: the APIs coding agents speak (AG-1, AG-2). Thin, as
the chat routes: each request goes to the balancer, which hands it to a node that frames the
answer in the request's own API. Stored responses live on the balancer (a node has none).
Errors under ``/v1/messages`` take Anthropic's shape (``errors.init_app``); ``?beta=true``
and the ``anthropic-version`` header are accepted as Claude Code sends them."""

from __future__ import annotations

from flask import Blueprint, Response, g, request

from .. import errors
from ..balancer.providers import ANTHROPIC_HEADERS
from ..dialects import COUNT_TOKENS, MESSAGES, RESPONSES
from ..disconnect import ClientWatch
from .common import forward_request, relay, request_bytes, require, respond, runtime

bp = Blueprint("dialects", __name__, url_prefix="/v1")


def _anthropic_headers() -> tuple[tuple[str, str], ...]:
    """The version and betas a client asked for, for a request that goes on to Anthropic."""
    return tuple((k, request.headers[k]) for k in ANTHROPIC_HEADERS if k in request.headers)


@bp.post("/messages")
@require("api")
def messages() -> Response:
    return forward_request(MESSAGES, headers=_anthropic_headers())


@bp.post("/messages/count_tokens")
@require("api")
def count_tokens() -> Response:
    return forward_request(COUNT_TOKENS, headers=_anthropic_headers())


@bp.post("/responses")
@require("api")
def create_response() -> Response:
    rt = runtime()
    if rt.responses is None:  # a node: its balancer expanded and keeps the responses
        return forward_request(RESPONSES)
    return relay(rt.responses.create(request_bytes(), g.principal,
                                     ClientWatch.of(request.environ)))


def _stored():  # noqa: ANN202 - StoredResponses
    found = runtime().responses
    if found is None:  # a node keeps no responses: its balancer does
        raise errors.not_found(request.path)
    return found


@bp.get("/responses/<response_id>")
@require("api")
def get_response(response_id: str) -> Response:
    return respond(_stored().get(response_id, g.principal))


@bp.get("/responses/<response_id>/input_items")
@require("api")
def response_input_items(response_id: str) -> Response:
    return respond(_stored().input_items(response_id, g.principal))


@bp.delete("/responses/<response_id>")
@require("api")
def delete_response(response_id: str) -> Response:
    return respond(_stored().delete(response_id, g.principal))
