"""No input yields a 500 (AP-2, SC-6): model ids, bodies, headers and query strings drawn at
random by Hypothesis, against every route under ``/v1``, ``/v0`` and ``/api``. Whatever a
client sends, the answer is below 500 and, under those prefixes, JSON (or, for a stream that
started, SSE events of JSON).

One app per module, served to Flask's test client (a request costs well under a
millisecond); a tiny real GGUF model is installed, so well-formed requests reach an engine
and generate (a 64-token context keeps that short). Example counts are bounded for CI: run
with ``--hypothesis-show-statistics`` to see them; ``HYPOTHESIS_EXAMPLES`` scales them up for a
longer hunt.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from llmlb import create_app

from .conftest import CLOSED_ENDPOINT

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "100"))
# No "explain" phase: it re-runs a failure hundreds of times to annotate it (20 s a failure).
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
AUTH = {"Authorization": "Bearer sk_debug"}
MODEL = "tiny"  # installed: requests that validate reach the engine
PREFIXES = ("/v1", "/v0", "/api")

# --- strategies -----------------------------------------------------------------------------

# Text of every kind: lone surrogates, NULs, controls, far planes, and id-like text.
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
any_text = st.text(max_size=40) | st.text(st.characters() | surrogates, max_size=40)
id_text = st.text(string.ascii_letters + string.digits + "-_./", max_size=300)
model_ids = st.sampled_from([MODEL, "TINY", "tiny-gguf", "a" * 256, "a/" * 128, "..", "/x",
                             "x//y", ".hidden", "x.", "a" * 257]) | id_text | any_text
json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=False) | any_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"]) | json_values,
     "content": any_text | json_values},
    optional={"name": json_values, "tool_calls": json_values, "tool_call_id": json_values}),
    max_size=3) | json_values
OPENAI_FIELDS = {
    "model": model_ids | json_values,
    "messages": messages,
    "prompt": any_text | json_values,
    "input": any_text | st.lists(any_text, max_size=3) | json_values,
    "max_tokens": st.integers(-5, 2**40) | json_values,
    "max_completion_tokens": st.integers(-5, 100) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-1, 2) | json_values,
    "stop": any_text | st.lists(any_text, max_size=6) | json_values,
    "seed": st.integers(-2**70, 2**70) | json_values,
    "n": st.integers(-1, 3) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values})
    | json_values,
    "tools": json_values, "tool_choice": json_values, "response_format": json_values,
    "logprobs": json_values, "top_logprobs": json_values, "logit_bias": json_values,
    "frequency_penalty": json_values, "presence_penalty": json_values,
    "encoding_format": st.sampled_from(["float", "base64"]) | json_values,
    "user": json_values,
}
ADMIN_FIELDS = {"model_id": model_ids | json_values, "name": any_text | json_values,
                "scopes": any_text | json_values, "scope": any_text | json_values,
                "url": any_text | json_values, "secret": any_text | json_values,
                "report": json_values}


def objects(fields: dict) -> st.SearchStrategy:
    """A JSON object with some of ``fields`` (each of any value) and maybe unknown keys."""
    return st.fixed_dictionaries({}, optional=fields).flatmap(
        lambda known: st.dictionaries(any_text, json_values, max_size=2).map(
            lambda extra: {**extra, **known}))


def encoded(body: st.SearchStrategy) -> st.SearchStrategy:
    """The body as bytes: JSON (ASCII escapes, so lone surrogates travel as \\udcxx), or not
    quite JSON, or no JSON at all."""
    as_json = body.map(lambda b: json.dumps(b).encode())
    return (as_json | as_json.map(lambda b: b[: len(b) // 2])
            | st.binary(max_size=200) | st.sampled_from([b"", b"null", b"[]", b"{", b"\xff"]))


header_value = st.text(st.characters(min_codepoint=32, max_codepoint=255,
                                     blacklist_characters="\x7f"), max_size=60)
headers = st.fixed_dictionaries({}, optional={
    "Authorization": st.sampled_from(["Bearer sk_debug", "Bearer ", "Basic x", "bearer sk_debug"])
    | header_value,
    "X-API-Key": header_value,
    "Content-Type": st.sampled_from(["application/json", "text/plain", "multipart/form-data",
                                     "application/x-www-form-urlencoded"]) | header_value,
    "Accept": header_value, "Accept-Encoding": header_value, "Range": header_value,
    "Cookie": header_value, "Origin": header_value, "X-CSRF-Token": header_value,
    "If-None-Match": header_value, "If-Modified-Since": header_value,
    "X-Forwarded-For": header_value, "Transfer-Encoding": st.just("chunked"),
})
queries = st.dictionaries(any_text, any_text, max_size=3)

# --- the app ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, tiny):  # noqa: ANN201 - a Flask app
    home = tmp_path_factory.mktemp("properties")
    (home / "models" / MODEL).mkdir(parents=True)
    shutil.copy(tiny["llama-gguf"], home / "models" / MODEL / "model.gguf")
    (home / "models" / "embedder").mkdir()
    for f in Path(tiny["bert-embed"]).iterdir():
        shutil.copy(f, home / "models" / "embedder" / f.name)
    app = create_app({"home": home, "dev": True, "hf_endpoint": CLOSED_ENDPOINT,
                      "plugins_dir": [str(home / "plugins")], "context_length": 64,
                      "resolve_wait_seconds": 1, "download_timeout_seconds": 1})
    yield app
    app.extensions["llmlb"].close()


@pytest.fixture(scope="module")
def node_app(tmp_path_factory: pytest.TempPathFactory, tiny):  # noqa: ANN201 - a Flask app
    """A node (``llmlb node``): its balancer is a closed port, so it never registers."""
    home = tmp_path_factory.mktemp("properties-node")
    (home / "models" / MODEL).mkdir(parents=True)
    shutil.copy(tiny["llama-gguf"], home / "models" / MODEL / "model.gguf")
    app = create_app({"home": home, "dev": True, "role": "node", "hf_endpoint": CLOSED_ENDPOINT,
                      "balancer_url": CLOSED_ENDPOINT, "node_api_key": "sk-node-test",
                      "plugins_dir": [str(home / "plugins")], "context_length": 64,
                      "resolve_wait_seconds": 1, "download_timeout_seconds": 1})
    yield app
    app.extensions["llmlb"].close()


def check(response, path: str) -> None:  # noqa: ANN001 - a werkzeug test response
    """Below 500, and under the API's prefixes a JSON body (or SSE events of JSON)."""
    body = response.get_data()
    event(f"HTTP {response.status_code}")  # --hypothesis-show-statistics lists the answers
    where = f"{response.request.method} {path} -> {response.status_code}: {body[:300]!r}"
    assert response.status_code < 500, where
    if not path.startswith(PREFIXES) or response.request.method == "HEAD":
        return  # a HEAD answer has headers only
    kind = response.headers.get("Content-Type", "")
    if kind.startswith("text/event-stream"):
        assert response.status_code == 200, where
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", where
        for data in events[:-1]:
            json.loads(data)
    elif response.status_code == 204:
        assert body == b"" and response.request.method == "OPTIONS", where
    elif kind.startswith("application/octet-stream"):
        assert path.startswith("/v1/models/blob/") and response.status_code in (200, 206, 304)
    else:
        assert kind.startswith("application/json"), where
        json.loads(body)


def call(app, method: str, path: str, query: dict, hdrs: dict, body: bytes | None):  # noqa: ANN001,ANN201
    path_q = f"{path}?{urlencode(query, errors='surrogatepass')}" if query else path
    with app.test_client() as client:
        response = client.open(path_q, method=method, headers=hdrs, data=body)
        try:
            check(response, path)
        finally:
            response.close()


def in_path(model_id: str) -> str:
    return quote(model_id.encode("utf-8", "surrogatepass"), safe="/")


# --- the properties ---------------------------------------------------------------------------

POST_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


@FUZZ
@given(route=st.sampled_from(POST_ROUTES), body=encoded(objects(OPENAI_FIELDS)),
       hdrs=headers, query=queries)
def test_openai_bodies_never_500(app, route: str, body: bytes, hdrs: dict, query: dict) -> None:
    call(app, "POST", route, query, {**AUTH, **hdrs}, body)


@FUZZ
@given(route=st.sampled_from(POST_ROUTES), model=st.just(MODEL) | model_ids | json_values,
       fields=objects({k: OPENAI_FIELDS[k] for k in ("max_tokens", "stream", "temperature",
                                                       "stop")}))
def test_well_formed_requests_for_any_model_never_500(app, route: str, model, fields: dict,
                                                      ) -> None:
    body = {**fields, "model": model, "messages": [{"role": "user", "content": "Hello"}],
            "prompt": "Hello", "input": "Hello"}
    call(app, "POST", route, {}, {**AUTH, "Content-Type": "application/json"},
         json.dumps(body).encode())


ID_ROUTES = ["/v1/models/{}", "/v1/models/blob/{}", "/v1/models/blob/{}/model.gguf",
             "/v0/models/registry/{}/manifest.json", "/v0/models/{}/status",
             "/api/models/{}", "/v0/nodes/{}/heartbeat", "/v0/nodes/{}", "/api/keys/{}"]


@FUZZ
@given(route=st.sampled_from(ID_ROUTES), model_id=model_ids,
       method=st.sampled_from(["GET", "GET", "HEAD", "DELETE", "POST", "PUT", "PATCH"]),
       hdrs=headers, query=queries)
def test_model_ids_in_paths_never_500(app, route: str, model_id: str, method: str, hdrs: dict,
                                      query: dict) -> None:
    if method == "DELETE" and model_id.lower() in (MODEL, "embedder"):
        model_id = "not-" + model_id  # keep the installed models for the other examples
    call(app, method, route.format(in_path(model_id)), query, {**AUTH, **hdrs}, None)


LISTING_ROUTES = ["/v1/models", "/v0/engines", "/v0/nodes", "/api/models", "/api/models/local",
                  "/api/keys", "/v1", "/v0", "/api", "/v1/nothing", "/api/models/register",
                  "/v0/node/report", "/health"]


@FUZZ
@given(route=st.sampled_from(LISTING_ROUTES), method=st.sampled_from(["GET", "POST", "OPTIONS"]),
       hdrs=headers, query=queries)
def test_headers_and_query_strings_never_500(app, route: str, method: str, hdrs: dict,
                                             query: dict) -> None:
    body = b"{}" if method == "POST" else None
    call(app, method, route, query, hdrs, body)


@FUZZ
@given(route=st.sampled_from(["/api/models/register", "/api/keys", "/v0/nodes"]),
       body=encoded(objects(ADMIN_FIELDS)), hdrs=headers)
def test_admin_bodies_never_500(app, route: str, body: bytes, hdrs: dict) -> None:
    if route == "/v0/nodes":
        # A node that registers is called back by the balancer: keep it on a closed port.
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "url" in parsed:
            parsed["url"] = CLOSED_ENDPOINT
            body = json.dumps(parsed).encode()
    call(app, "POST", route, {}, {**AUTH, **hdrs}, body)


NODE_ROUTES = [("POST", "/v0/node/pull"), ("DELETE", "/v0/node/models/{}"),
               ("GET", "/v0/node/report"), ("POST", "/v1/chat/completions"),
               ("GET", "/v1/models/{}"), ("GET", "/v1/models/blob/{}/model.gguf")]


@FUZZ
@given(route=st.sampled_from(NODE_ROUTES), model_id=model_ids,
       body=encoded(objects({**ADMIN_FIELDS, **OPENAI_FIELDS})), hdrs=headers, query=queries)
def test_a_nodes_routes_never_500(node_app, route: tuple[str, str], model_id: str, body: bytes,
                                  hdrs: dict, query: dict) -> None:
    method, path = route
    if method == "DELETE" and model_id.lower() == MODEL:
        model_id = "not-" + model_id
    call(node_app, method, path.format(in_path(model_id)), query, {**AUTH, **hdrs},
         body if method == "POST" else None)
