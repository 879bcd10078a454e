"""Example engine plugin: serve a model that runs on another OpenAI-compatible server.

Put a file ending in ``.upstream.json`` in a model directory, e.g.
``~/.llmlb/models/big-llama/model.upstream.json``::

    {"base_url": "http://gpu-box:8000/v1", "model": "meta-llama/Llama-3.1-70B-Instruct",
     "api_key_env": "LLMLB_ENDPOINT_KEY_GPU_BOX", "parallel": 32}

and ``big-llama`` is listed by ``GET /v1/models`` and answers chat, completion and embedding
calls by relaying them (streamed) to that server: vLLM, Ollama, llama.cpp's server, another
llmlb, or a hosted API. ``api_key_env`` names an environment variable, so the secret stays out
of the file; like an endpoint's, it must be named ``LLMLB_ENDPOINT_KEY_*`` (a file that names
``HF_TOKEN`` would send it to whatever ``base_url`` says: such files can also arrive with a
model's files). The upstream batches requests on its own, so llmlb lets ``parallel`` calls (32 by
default) run at once instead of queueing them one behind the other, over a pool of kept-alive
connections (urllib3); an upstream's error reaches the client with its status (a 404 stays a
404). This shows the whole
plugin contract: a new format (``upstream``) with its file suffix, an availability check,
``load``, a loaded model that declares its concurrency, sends its request when called (so an
upstream refusal is an error before any response starts) and streams ``TokenText`` events
until it is closed. It computes nothing here, so it needs no compute thread.

To put another server behind llmlb, add it as an endpoint (``llmlb endpoints add``): health
checks, failover, its own model ids, its load in the routing. This plugin is an example of the
engine contract, and serves one upstream model under a local name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import urllib3

from engines.base import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    Availability,
    Engine,
    EngineError,
    Finished,
    GenerationEvent,
    LoadedModel,
    LoadOptions,
    SamplingParams,
    Started,
    TokenText,
)
from llmlb import errors
from llmlb.balancer.credentials import ENV_PREFIX, EnvAllowlist
from llmlb.hookspecs import hookimpl

TIMEOUT = 300
DEFAULT_PARALLEL = 32


class _Relay(Iterator[GenerationEvent]):
    """The events of one relayed stream; ``close()`` drops the upstream connection, also
    when iteration never began."""

    def __init__(self, response, events: Iterator[GenerationEvent]) -> None:  # noqa: ANN001
        self._response, self._events = response, events

    def __iter__(self) -> _Relay:
        return self

    def __next__(self) -> GenerationEvent:
        return next(self._events)

    def close(self) -> None:
        self._events.close()
        if self._response.connection is not None:  # not back in the pool: drop it
            self._response.close()


class UpstreamModel(LoadedModel):
    capabilities = frozenset({CHAT, COMPLETION, EMBEDDINGS})

    def __init__(self, base_url: str, model: str, api_key: str | None,
                 parallel: int = DEFAULT_PARALLEL) -> None:
        self.base_url, self.model, self.api_key = base_url.rstrip("/"), model, api_key
        self.parallel = parallel  # the upstream batches: do not serialise calls to it
        # One kept-alive connection per call in flight: no TCP (or TLS) handshake per call.
        self._http = urllib3.PoolManager(maxsize=parallel, block=False, retries=False,
                                         timeout=urllib3.Timeout(connect=10, read=TIMEOUT))

    def _post(self, path: str, body: dict) -> urllib3.BaseHTTPResponse:
        """The upstream's response, its body unread; its error relayed with its status."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            response = self._http.request("POST", f"{self.base_url}{path}",
                                          body=json.dumps(body).encode(), headers=headers,
                                          preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise EngineError(f"upstream {self.base_url} unreachable: {exc}") from exc
        if response.status >= 400:
            data = response.read()
            response.release_conn()
            try:
                error = json.loads(data)
            except ValueError:
                error = None
            if not isinstance(error, dict) or not isinstance(error.get("error"), dict):
                error = {"error": {"message": f"upstream {self.base_url} answered "
                                              f"{response.status}: "
                                              f"{data.decode(errors='replace')[:300]}"}}
            raise errors.relayed(response.status, error)
        return response

    def unload(self) -> None:
        self._http.clear()

    def _stream(self, path: str, body: dict, params: SamplingParams) -> _Relay:
        body = {**body, "model": self.model, "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": params.temperature, "top_p": params.top_p}
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        if params.seed is not None:
            body["seed"] = params.seed
        response = self._post(path, body)  # now: an upstream refusal is a clean error
        return _Relay(response, self._events(response))

    def _events(self, response) -> Iterator[GenerationEvent]:  # noqa: ANN001
        yield Started(0)  # the upstream reports the real count with its usage, at the end
        reason, usage, complete = "stop", {}, False
        try:
            for raw in _lines(response):
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise EngineError(f"upstream error: {chunk['error'].get('message')}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if text:
                        yield TokenText(text)
                    reason = choice.get("finish_reason") or reason
            complete = True
        except urllib3.exceptions.HTTPError as exc:
            raise EngineError(f"upstream {self.base_url} broke off: {exc}") from exc
        finally:
            if complete:
                response.release_conn()  # read to the end: the connection can serve again
            else:
                response.close()  # cut short: the upstream sees the connection close
        yield Finished(reason, usage.get("prompt_tokens"), usage.get("completion_tokens"))

    def chat(self, messages: list[dict], params: SamplingParams) -> Iterator[GenerationEvent]:
        return self._stream("/chat/completions", {"messages": messages}, params)

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[GenerationEvent]:
        return self._stream("/completions", {"prompt": prompt}, params)

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        response = self._post("/embeddings", {"model": self.model, "input": list(texts),
                                              "encoding_format": "float"})
        try:
            result = json.loads(response.read())
        finally:
            response.release_conn()
        vectors = [item["embedding"] for item in sorted(result["data"],
                                                        key=lambda d: d["index"])]
        return vectors, int(result.get("usage", {}).get("prompt_tokens", 0))


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The body's lines as they arrive (``read1``: what has come, without waiting for more)."""
    pending = b""
    while data := response.read1(65536):
        pending += data
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


class UpstreamEngine(Engine):
    name = "openai-upstream"
    formats = {"upstream": (".upstream.json",)}

    def availability(self) -> Availability:
        return Availability(True, device="remote")

    def parallel(self, options: LoadOptions) -> int:
        return DEFAULT_PARALLEL

    def load(self, model_dir: Path, artifacts: Sequence[Path],
             options: LoadOptions = LoadOptions()) -> LoadedModel:  # noqa: B008
        try:
            config = json.loads(artifacts[0].read_text())
            base_url, model = config["base_url"], config["model"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"{artifacts[0].name} needs base_url and model: {exc}") from exc
        key_env = config.get("api_key_env")
        if key_env is not None and not (isinstance(key_env, str)
                                        and EnvAllowlist().allows(key_env)):
            raise EngineError(f"{artifacts[0].name}: api_key_env must name a variable "
                              f"{ENV_PREFIX}…, not {key_env!r}")
        parallel = config.get("parallel", DEFAULT_PARALLEL)
        if not isinstance(parallel, int) or parallel < 1:
            raise EngineError(f"{artifacts[0].name}: parallel must be a positive integer")
        return UpstreamModel(base_url, model, os.environ.get(key_env) if key_env else None,
                             parallel)


@hookimpl
def register_engines():
    return [UpstreamEngine()]
