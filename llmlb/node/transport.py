"""The node in this process behind the balancer's node seam: ``send`` takes the request the
balancer would send a node over HTTP and answers it as that node would, by running
``serving/`` on this process's models (standalone, and a node serving its balancer).

``SERVING`` is the node's one dispatch: which serving function answers which operation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from .. import errors
from ..balancer.upstream import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    SSE_HEADERS,
    NodeResponse,
    ProxyRequest,
    error_response,
    json_response,
)
from ..dialects import COUNT_TOKENS, MESSAGES, RESPONSES
from ..disconnect import ClientLeft, ClientWatch
from ..serving import agents
from ..serving import openai as serving
from ..serving.inference import Runner
from ..serving.protocol import PromptLimits
from ..serving.sse import SSEStream
from .local import LocalNode

log = logging.getLogger(__name__)

Serve = Callable[[Runner, dict, str, PromptLimits, "ClientWatch | None"], "dict | SSEStream"]
SERVING: dict[str, Serve] = {CHAT: serving.chat_completion, COMPLETION: serving.completion,
                             EMBEDDINGS: serving.embeddings,
                             RESPONSES: agents.serve_responses, MESSAGES: agents.serve_messages,
                             COUNT_TOKENS: agents.count_tokens}


def _encoded(stream: SSEStream) -> Iterator[bytes]:
    for frame in stream:
        yield frame if isinstance(frame, bytes) else frame.encode()


class InProcessNode:
    """Runs requests on this process's engines; prompts over ``limits`` are refused before
    anything tokenizes them."""

    def __init__(self, name: str, node: LocalNode, limits: PromptLimits) -> None:
        self.name = name
        self.local = node
        self.limits = limits

    def send(self, request: ProxyRequest) -> NodeResponse:
        try:
            if request.id_refusal is not None:
                raise request.id_refusal
            result = SERVING[request.operation](self.local.runner(request), request.payload,
                                                request.model_id, self.limits, request.client)
        except ClientLeft:
            return error_response(errors.client_closed())
        except Exception as exc:
            err = errors.from_exception(exc)
            if err.code == "internal_error":
                log.exception("Unhandled error serving %s", request.path)
            return error_response(err, request.operation)
        if isinstance(result, SSEStream):
            return NodeResponse(200, list(SSE_HEADERS), _encoded(result), result.close)
        return json_response(200, result)
