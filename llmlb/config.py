"""The one Settings object: defaults < ``$LLMLB_HOME/.env`` < environment < CLI flags.

Every setting is declared once in ``OPTIONS``; the CLI flags, ``--help`` texts, the README's
table and the loader all read that table, so a setting cannot exist in one place only.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Option:
    """One setting: its attribute, the environment names read (first wins), default and help."""

    attr: str
    env: tuple[str, ...]
    default: Any
    kind: str  # "str" | "int" | "float" | "bool" | "path" | "list"
    help: str
    flag: str | None = None  # CLI flag, when it has one
    commands: tuple[str, ...] = ("serve", "node")  # the commands that take the flag


ROLES = ("standalone", "balancer", "node")
NODE_PORT = 8081  # `llmlb node`'s default port, beside the balancer's 8080
WORKER_CLASSES = ("gthread", "gevent")
GEVENT_CONNECTIONS = 1000  # gunicorn's worker_connections: requests per gevent worker
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


OPTIONS: tuple[Option, ...] = (
    Option("role", ("LLMLB_ROLE",), "standalone", "str",
           "What this llmlb is: standalone (the balancer with an in-process node), balancer "
           "(routes to registered nodes, runs no model) or node (runs models for a balancer; "
           "what `llmlb node` starts).", "--role", ("serve",)),
    Option("home", ("LLMLB_HOME",), "~/.llmlb", "path",
           "Directory for llmlb's state (SQLite database, .env, plugins).", "--home"),
    Option("models_dir", ("XLLM_MODELS_DIR", "LLM_MODELS_DIR"), None, "path",
           "Model directory (default: $LLMLB_HOME/models). LLM_MODELS_DIR is read for "
           "compatibility.", "--models-dir"),
    Option("database", ("LLMLB_DATABASE",), None, "path",
           "SQLite database file (default: $LLMLB_HOME/llmlb.db).", "--database"),
    Option("host", ("LLMLB_HOST",), "127.0.0.1", "str", "Address to listen on.", "--host"),
    Option("port", ("LLMLB_PORT",), 8080, "int", "Port to listen on.", "--port"),
    Option("workers", ("LLMLB_WORKERS",), 1, "int",
           "gunicorn worker processes for `llmlb serve` (each holds its own loaded models).",
           "--workers"),
    Option("threads", ("LLMLB_THREADS",), 32, "int",
           "Threads per worker (requests, streams and WebSockets each hold one).", "--threads"),
    Option("worker_class", ("LLMLB_WORKER_CLASS",), None, "str",
           "gunicorn worker class: gthread (threads; the default where models run) or gevent "
           "(the default of a balancer: thousands of streams per worker)."),
    Option("dev", ("LLMLB_DEV",), False, "bool",
           "Development mode: accepts the API key sk_debug and the login admin/test. "
           "Never in production.", "--dev"),
    Option("log_level", ("LLMLB_LOG_LEVEL",), "INFO", "str", "Log level.", "--log-level"),
    Option("supported_models", ("LLMLB_SUPPORTED_MODELS",), None, "path",
           "Catalog file (default: the supported_models.json shipped with llmlb).",
           "--supported-models"),
    Option("shared_models_dir", ("LLMLB_SHARED_MODELS_DIR",), None, "path",
           "Shared model directory (e.g. an NFS mount) served in place, never copied.",
           "--shared-models-dir"),
    Option("hf_token", ("HF_TOKEN",), None, "str",
           "Hugging Face token for private or gated repositories."),
    Option("hf_endpoint", ("HF_ENDPOINT",), "https://huggingface.co", "str",
           "Hugging Face endpoint (a mirror may stand in for the hub)."),
    Option("download_allowlist", ("LLMLB_DOWNLOAD_ALLOWLIST",), None, "list",
           "Hosts models may be downloaded from, comma-separated (default: the host of "
           "HF_ENDPOINT; 'none' disables downloads)."),
    Option("balancer_url", ("LLMLB_BALANCER_URL",), None, "str",
           "Balancer a node registers with and may fetch model files through "
           "(/v1/models/blob/...).", "--balancer-url"),
    Option("node_api_key", ("LLMLB_NODE_API_KEY",), None, "str",
           "API key with the node scope, used against the balancer."),
    Option("node_name", ("LLMLB_NODE_NAME",), None, "str",
           "This node's name at the balancer (default: the host name). Restarting with the "
           "same name keeps the node's identity.", "--name", ("node",)),
    Option("advertise_url", ("LLMLB_ADVERTISE_URL",), None, "str",
           "How the balancer reaches this node (default: http://<host>:<port>).",
           "--advertise-url", ("node",)),
    Option("heartbeat_seconds", ("LLMLB_HEARTBEAT_SECONDS",), 5.0, "float",
           "How often a node reports its hardware, models and load to the balancer."),
    Option("node_timeout_seconds", ("LLMLB_NODE_TIMEOUT_SECONDS",), 15.0, "float",
           "A node without a heartbeat for this long is offline and gets no traffic."),
    Option("cooldown_seconds", ("LLMLB_COOLDOWN_SECONDS",), 1.0, "float",
           "How long a node that failed a request gets no traffic; doubled for each failure "
           "in a row."),
    Option("cooldown_max_seconds", ("LLMLB_COOLDOWN_MAX_SECONDS",), 60.0, "float",
           "The longest cooldown, also for a node's Retry-After."),
    Option("affinity", ("LLMLB_AFFINITY",), True, "bool",
           "Send the turns of a conversation to the node that answered its first turn (its "
           "prompt cache is warm), unless that node is overloaded."),
    Option("affinity_load_factor", ("LLMLB_AFFINITY_LOAD_FACTOR",), 1.25, "float",
           "Load bound of affinity: a node takes a conversation only while its requests in "
           "flight stay within this factor of the average (bounded-load consistent hashing)."),
    Option("proxy_connect_timeout_seconds", ("LLMLB_PROXY_CONNECT_TIMEOUT_SECONDS",), 3.0,
           "float", "Timeout for connecting to a node; past it the request goes to another."),
    Option("proxy_read_timeout_seconds", ("LLMLB_PROXY_READ_TIMEOUT_SECONDS",), 600.0, "float",
           "Longest wait for a node's answer or its next streamed chunk."),
    Option("endpoint_check_seconds", ("LLMLB_ENDPOINT_CHECK_SECONDS",), 10.0, "float",
           "How often the balancer asks each external endpoint for its models (GET /v1/models), "
           "its health and its load (its Prometheus /metrics, where it has one); a failed check "
           "makes it offline until one succeeds."),
    Option("endpoint_max_requests", ("LLMLB_ENDPOINT_MAX_REQUESTS",), 64, "int",
           "Requests one external endpoint may hold at once (vLLM and Ollama accept and queue "
           "everything); more go to another candidate, or get 429 with Retry-After. 0: no "
           "limit."),
    Option("openai_api_key", ("OPENAI_API_KEY",), None, "str",
           "OpenAI's API key: model names openai:<model> go to OpenAI with it (unset: such "
           "names are a 404 that says to set it). Sent only to OPENAI_BASE_URL."),
    Option("openai_base_url", ("OPENAI_BASE_URL",), "https://api.openai.com/v1", "str",
           "Where openai:<model> requests go (a proxy, or a stand-in in tests)."),
    Option("anthropic_api_key", ("ANTHROPIC_API_KEY",), None, "str",
           "Anthropic's API key: model names anthropic:<model> go to Anthropic with it. Sent "
           "only to ANTHROPIC_BASE_URL."),
    Option("anthropic_base_url", ("ANTHROPIC_BASE_URL",), "https://api.anthropic.com", "str",
           "Where anthropic:<model> requests go."),
    Option("google_api_key", ("GOOGLE_API_KEY", "GEMINI_API_KEY"), None, "str",
           "Google's Gemini API key: model names google:<model> go to the Gemini API with it. "
           "Sent only to GOOGLE_BASE_URL."),
    Option("google_base_url", ("GOOGLE_BASE_URL",), "https://generativelanguage.googleapis.com",
           "str", "Where google:<model> requests go."),
    Option("provider_check_seconds", ("LLMLB_PROVIDER_CHECK_SECONDS",), 3600.0, "float",
           "How often the balancer asks each hosted provider it has a key for which models it "
           "has (listed in /v1/models as <provider>:<model>); any model name of the provider "
           "is sent on, listed or not."),
    Option("history_retention_days", ("LLMLB_HISTORY_RETENTION_DAYS",), 7.0, "float",
           "How long the request history (one row per request: time, key, model, node, "
           "status, latency, tokens) is kept; 0 keeps none."),
    Option("responses_retention_days", ("LLMLB_RESPONSES_RETENTION_DAYS",), 30.0, "float",
           "Days a stored response of the Responses API (\"store\": true, the default) is "
           "kept for previous_response_id and GET /v1/responses/{id}."),
    Option("resolve_wait_seconds", ("LLMLB_RESOLVE_WAIT_SECONDS",), 300.0, "float",
           "How long a request waits for its model to download before a 503."),
    Option("max_resolve_waiters", ("LLMLB_MAX_RESOLVE_WAITERS",), 32, "int",
           "Requests that may wait for downloads at once per process; more get a 503."),
    Option("download_timeout_seconds", ("LLMLB_DOWNLOAD_TIMEOUT_SECONDS",), 300.0, "float",
           "A download with no progress for this long fails with download_failed."),
    Option("keep_alive_seconds", ("LLMLB_KEEP_ALIVE_SECONDS",), 300.0, "float",
           "Idle time after which a loaded model is unloaded."),
    Option("max_loaded_models", ("LLMLB_MAX_LOADED_MODELS",), 2, "int",
           "Models kept loaded at once per process (least recently used is unloaded)."),
    Option("context_length", ("LLMLB_CONTEXT_LENGTH",), 4096, "int",
           "Largest context (prompt + answer, in tokens) of one request; the model's own "
           "limit wins when smaller. A batching model keeps room for this many tokens per "
           "sequence it decodes at once."),
    Option("parallel_sequences", ("LLMLB_PARALLEL_SEQUENCES",), None, "int",
           "Requests one loaded model decodes together in a batch (default: the engine's, "
           "4 for GGUF and safetensors; ONNX takes 1); more wait in its queue."),
    Option("max_prompt_chars", ("LLMLB_MAX_PROMPT_CHARS",), 1_000_000, "int",
           "Largest prompt in characters (all message contents together, or a completion's "
           "or embedding request's inputs); checked before tokenizing, 400 above."),
    Option("max_messages", ("LLMLB_MAX_MESSAGES",), 2048, "int",
           "Most messages one chat request may hold; checked before tokenizing, 400 above."),
    Option("max_queued_requests", ("LLMLB_MAX_QUEUED_REQUESTS",), 16, "int",
           "Requests that may wait for one busy model; more get a 503 with Retry-After."),
    Option("max_body_bytes", ("LLMLB_MAX_BODY_BYTES",), 8 * 1024 * 1024, "int",
           "Largest request body accepted (413 above)."),
    Option("admin_username", ("LLMLB_ADMIN_USERNAME",), "admin", "str",
           "User name of the first admin, created at the first start."),
    Option("admin_password", ("LLMLB_ADMIN_PASSWORD",), None, "str",
           "Password of the first admin (default: generated and printed once)."),
    Option("secret_key", ("LLMLB_SECRET_KEY",), None, "str",
           "Key signing dashboard sessions (default: generated once, kept in the database)."),
    Option("plugins_dir", ("LLMLB_PLUGINS_DIR",), None, "list",
           "Directories of drop-in engine plugins, separated by ':' (default: the project's "
           "plugins/ and $LLMLB_HOME/plugins)."),
    Option("trusted_proxies", ("LLMLB_TRUSTED_PROXIES",), 0, "int",
           "Reverse proxies in front of llmlb whose X-Forwarded-* headers are trusted "
           "(1 behind nginx)."),
    Option("secure_cookies", ("LLMLB_SECURE_COOKIES",), False, "bool",
           "Mark the dashboard's session cookie Secure (HTTPS only); set it behind TLS."),
    Option("session_lifetime_seconds", ("LLMLB_SESSION_LIFETIME_SECONDS",), 28800.0, "float",
           "How long a dashboard login lasts, from the moment of login (logging out or a "
           "password change ends it sooner)."),
    Option("login_max_failures", ("LLMLB_LOGIN_MAX_FAILURES",), 5, "int",
           "Failed dashboard logins allowed per client address and per user name within "
           "LLMLB_LOGIN_WINDOW_SECONDS; more get 429."),
    Option("login_window_seconds", ("LLMLB_LOGIN_WINDOW_SECONDS",), 900.0, "float",
           "The window in which failed logins are counted."),
    Option("max_websockets", ("LLMLB_MAX_WEBSOCKETS",), None, "int",
           "WebSockets open at once per worker (each holds a thread); more get 503. Must be "
           "below LLMLB_THREADS (default: half of it)."),
    Option("header_timeout_seconds", ("LLMLB_HEADER_TIMEOUT_SECONDS",), 5.0, "float",
           "Under gunicorn, a connection must send its request line and headers within this "
           "time once a thread takes it, or it is closed (slow clients cannot hold threads)."),
    Option("hf_stats_ttl_seconds", ("LLMLB_HF_STATS_TTL_SECONDS",), 3600.0, "float",
           "How long Hugging Face download/like counts are cached."),
    Option("hub_timeout_seconds", ("LLMLB_HUB_TIMEOUT_SECONDS",), 2.0, "float",
           "Timeout for Hugging Face API calls that only add information (stats)."),
)

OPTIONS_BY_ATTR = {o.attr: o for o in OPTIONS}


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    role: str
    home: Path
    models_dir: Path
    database: Path
    host: str
    port: int
    workers: int
    threads: int
    worker_class: str
    dev: bool
    log_level: str
    supported_models: Path
    shared_models_dir: Path | None
    hf_token: str | None
    hf_endpoint: str
    download_allowlist: tuple[str, ...]
    balancer_url: str | None
    node_api_key: str | None
    node_name: str
    advertise_url: str
    heartbeat_seconds: float
    node_timeout_seconds: float
    cooldown_seconds: float
    cooldown_max_seconds: float
    affinity: bool
    affinity_load_factor: float
    proxy_connect_timeout_seconds: float
    proxy_read_timeout_seconds: float
    endpoint_check_seconds: float
    endpoint_max_requests: int
    openai_api_key: str | None
    openai_base_url: str
    anthropic_api_key: str | None
    anthropic_base_url: str
    google_api_key: str | None
    google_base_url: str
    provider_check_seconds: float
    history_retention_days: float
    responses_retention_days: float
    resolve_wait_seconds: float
    max_resolve_waiters: int
    download_timeout_seconds: float
    keep_alive_seconds: float
    max_loaded_models: int
    context_length: int
    parallel_sequences: int | None
    max_prompt_chars: int
    max_messages: int
    max_queued_requests: int
    max_body_bytes: int
    admin_username: str
    admin_password: str | None
    secret_key: str | None
    plugins_dir: tuple[Path, ...]
    trusted_proxies: int
    secure_cookies: bool
    session_lifetime_seconds: float
    login_max_failures: int
    login_window_seconds: float
    max_websockets: int
    header_timeout_seconds: float
    hf_stats_ttl_seconds: float
    hub_timeout_seconds: float
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def locks_dir(self) -> Path:
        return self.models_dir / ".locks"

    @property
    def concurrency(self) -> int:
        """Requests one worker may serve at once (its threads, or gevent's connections)."""
        return GEVENT_CONNECTIONS if self.worker_class == "gevent" else self.threads

    @property
    def metrics_dir(self) -> Path:
        """prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR), wiped at start."""
        return self.home / "metrics"

    @property
    def runs_models(self) -> bool:
        """Whether this process has an in-process node (standalone and node roles)."""
        return self.role != "balancer"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _convert(option: Option, raw: Any) -> Any:
    if raw is None:
        return None
    if option.kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off", ""}:
            return False
        raise SettingsError(f"{option.env[0]} must be true or false, not {raw!r}")
    if option.kind in {"int", "float"}:
        try:
            value = int(raw) if option.kind == "int" else float(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{option.env[0]} must be a number, not {raw!r}") from None
        if value < 0:
            raise SettingsError(f"{option.env[0]} must not be negative, not {raw!r}")
        return value
    if option.kind == "path":
        return Path(str(raw)).expanduser()
    if option.kind == "list":
        if isinstance(raw, list | tuple):
            return tuple(str(x) for x in raw)
        sep = os.pathsep if option.attr == "plugins_dir" else ","
        return tuple(part.strip() for part in str(raw).split(sep) if part.strip())
    text = str(raw)
    return text if text != "" else None


def _layer_value(option: Option, layer: Mapping[str, Any]) -> Any:
    for name in option.env:
        if layer.get(name) not in (None, ""):
            return layer[name]
    return None


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build Settings from the layers; ``overrides`` are CLI flags (or a test's config)."""
    environ = os.environ if environ is None else environ
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    home_raw = overrides.get("home") or environ.get("LLMLB_HOME") or "~/.llmlb"
    home = Path(str(home_raw)).expanduser()
    dotenv = {k: v for k, v in dotenv_values(home / ".env").items() if v is not None} if (
        home / ".env").is_file() else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        value, source = option.default, "default"
        for name, layer in (("~/.llmlb/.env", dotenv), ("environment", environ)):
            raw = _layer_value(option, layer)
            if raw is not None:
                value, source = raw, name
        if option.attr in overrides:
            value, source = overrides[option.attr], "flag"
        values[option.attr] = _convert(option, value)
        sources[option.attr] = source

    values["home"] = home
    values["models_dir"] = values["models_dir"] or home / "models"
    values["database"] = values["database"] or home / "llmlb.db"
    values["supported_models"] = values["supported_models"] or default_catalog_path()
    values["hf_endpoint"] = values["hf_endpoint"].rstrip("/")
    if values["download_allowlist"] is None:
        values["download_allowlist"] = (urlsplit(values["hf_endpoint"]).hostname or "",)
    elif values["download_allowlist"] == ("none",):
        values["download_allowlist"] = ()
    if not values["plugins_dir"]:
        values["plugins_dir"] = (PROJECT_ROOT / "plugins", home / "plugins")
    else:
        values["plugins_dir"] = tuple(Path(p).expanduser() for p in values["plugins_dir"])
    for name in ("workers", "threads", "max_loaded_models", "max_body_bytes",
                 "login_max_failures", "context_length", "max_prompt_chars", "max_messages"):
        if values[name] < 1:
            raise SettingsError(f"{OPTIONS_BY_ATTR[name].env[0]} must be at least 1")
    if values["parallel_sequences"] is not None and values["parallel_sequences"] < 1:
        raise SettingsError("LLMLB_PARALLEL_SEQUENCES must be at least 1")
    # A WebSocket holds a worker thread for its whole life: some threads must stay free
    # for requests, whatever the number of sockets clients open.
    if values["max_websockets"] is None:
        values["max_websockets"] = values["threads"] // 2
    elif values["max_websockets"] >= values["threads"]:
        raise SettingsError(f"LLMLB_MAX_WEBSOCKETS ({values['max_websockets']}) must be below "
                            f"LLMLB_THREADS ({values['threads']})")
    _cluster_values(values, sources)
    return Settings(**values, sources=sources)


def _cluster_values(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Role, node name and advertised URL: checked, with their computed defaults."""
    values["role"] = (values["role"] or "standalone").lower()
    if values["role"] not in ROLES:
        raise SettingsError(f"LLMLB_ROLE must be one of {', '.join(ROLES)}, not "
                            f"{values['role']!r}")
    if values["role"] == "node" and sources["port"] == "default":
        values["port"] = NODE_PORT
    name = values["node_name"] or socket.gethostname().split(".")[0] or "node"
    if not NODE_NAME.fullmatch(name):
        raise SettingsError(f"LLMLB_NODE_NAME must be 1-64 letters, digits, '.', '_' or '-' "
                            f"(starting with a letter or digit), not {name!r}")
    values["node_name"] = name
    # Engines compute on real threads: gevent only where no model runs.
    values["worker_class"] = (values["worker_class"] or
                              ("gevent" if values["role"] == "balancer" else "gthread")).lower()
    if values["worker_class"] not in WORKER_CLASSES:
        raise SettingsError(f"LLMLB_WORKER_CLASS must be one of {', '.join(WORKER_CLASSES)}, "
                            f"not {values['worker_class']!r}")
    if values["worker_class"] == "gevent" and values["role"] != "balancer":
        raise SettingsError("LLMLB_WORKER_CLASS=gevent is for a balancer (LLMLB_ROLE=balancer): "
                            "engines need real threads")
    for attr in ("balancer_url", "advertise_url"):
        url = values[attr]
        if url is not None:
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
                raise SettingsError(f"{OPTIONS_BY_ATTR[attr].env[0]} must be an http(s) URL, "
                                    f"not {url!r}")
            values[attr] = url.rstrip("/")
    if values["advertise_url"] is None:
        host = values["host"]
        if host in ("", "0.0.0.0", "::"):  # listening everywhere: name the machine
            host = socket.getfqdn()
        elif ":" in host:
            host = f"[{host}]"
        values["advertise_url"] = f"http://{host}:{values['port']}"
    if values["affinity_load_factor"] < 1:
        raise SettingsError("LLMLB_AFFINITY_LOAD_FACTOR must be at least 1")


def default_catalog_path() -> Path:
    """The catalog shipped with llmlb: the repository's file, or the installed data file."""
    in_repo = PROJECT_ROOT / "supported_models.json"
    if in_repo.is_file():
        return in_repo
    import sys

    return Path(sys.prefix) / "share" / "llmlb" / "supported_models.json"
