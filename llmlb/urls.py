"""A member's address: what a node's or an endpoint's URL may be (checked where it enters, so
that no reader ever meets one it cannot use, SC-8), and the paths the balancer asks there.

- A **node**'s URL is the llmlb node's root (``http://gpu-a:8081``): the balancer asks
  ``/v1/...`` and ``/v0/node/...`` under its path.
- An **endpoint**'s URL is an OpenAI base URL, as the ``openai`` SDK takes it: its models are
  ``{base_url}/models``, chat ``{base_url}/chat/completions`` and so on, whatever the path
  (``…/v1``, ``…/v1beta/openai``, ``…/api/v1``). A base URL without a path
  (``http://gpu:8000``) means ``…/v1``, where every OpenAI-compatible server we know answers.
  Its Prometheus metrics are at the server's root: the base without a trailing ``/v1``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

MAX_URL = 2048
PRINTABLE_ASCII = frozenset(chr(c) for c in range(0x21, 0x7f))


class BadURL(ValueError):
    """A URL a member may not have; the message says what is wrong, for the user."""


def check_url(url: object) -> str:
    """The URL, without trailing slashes, when the balancer can use it: http(s), a host, a
    port from 1 to 65535, nothing but printable ASCII (no whitespace, CR/LF or NUL: they would
    reach request lines and logs), no credentials, query or fragment. Raises BadURL."""
    if not isinstance(url, str):
        raise BadURL("must be a string")
    url = url.strip(" ")
    if not url or len(url) > MAX_URL:
        raise BadURL(f"must be 1 to {MAX_URL} characters")
    if not set(url) <= PRINTABLE_ASCII:
        raise BadURL("must not hold spaces, control characters (CR, LF, NUL…) or non-ASCII "
                     "characters (write an international host name in its xn-- form)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # "http://[::1", "http://h:99999", "http://h:x"
        raise BadURL(f"is not a usable URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadURL("must be an http:// or https:// URL with a host")
    if port == 0:
        raise BadURL("must have a port from 1 to 65535")
    if "@" in parts.netloc:
        raise BadURL("must hold no credentials (give an endpoint's key as 'api_key')")
    if "?" in url or "#" in url:
        raise BadURL("must hold no query or fragment")
    return url.rstrip("/")


def node_path(url: str, path: str) -> str:
    """Where a node answers ``path`` (``/v1/chat/completions``, ``/v0/node/report``)."""
    return urlsplit(url).path.rstrip("/").removesuffix("/v1") + path


def endpoint_path(base_url: str, api_path: str) -> str:
    """Where an endpoint answers an OpenAI route given as ``/v1/...`` (``/v1/models`` is
    ``{base_url}/models``)."""
    base = urlsplit(base_url).path.rstrip("/") or "/v1"
    return base + api_path.removeprefix("/v1")


def metrics_path(base_url: str) -> str:
    """An endpoint's Prometheus metrics: at its server's root (vLLM, SGLang, llama-server)."""
    return urlsplit(base_url).path.rstrip("/").removesuffix("/v1") + "/metrics"
