"""The settings: defaults < ``$LLMLB_HOME/.env`` < environment < CLI flags.

Each setting is declared once, as a field of the section it belongs to (``ServerSettings``,
``ModelSettings``…): its type is the field's, its environment names, default, help, flag and
the commands that take the flag are the field's ``setting(...)``. ``OPTIONS`` (what the CLI
flags, ``--help``, the README's table and the loader read) is made from those fields, so a
setting cannot exist in one place only. ``Settings`` holds one object per section, and each
component is handed the section(s) it reads; ``settings.port`` (the flat name) reads through to
its section, for scripts and tests.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from dotenv import dotenv_values

from .urls import BadURL, check_url

PROJECT_ROOT = Path(__file__).resolve().parent.parent

ROLES = ("standalone", "balancer", "node")
FRONT = ("standalone", "balancer")  # what only a balancer does: users, dashboard, routing
NODE_PORT = 8081  # `llmlb node`'s default port, beside the balancer's 8080
WORKER_CLASSES = ("gthread", "gevent")
GEVENT_CONNECTIONS = 1000  # gunicorn's worker_connections: requests per gevent worker
MIN_PASSWORD_LENGTH = 8  # NIST SP 800-63B's floor for a password a user chooses
# Where a hub redirects its downloads to, allowed along with the hub by default.
HUB_CDN_HOSTS = {"huggingface.co": ("hf.co",)}
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SERVE_AND_NODE = ("serve", "node")


@dataclass(frozen=True)
class Option:
    """One setting: its attribute, the environment names read (first wins), default and help,
    its CLI flag and the commands that take it, the roles that read it, and the section it
    belongs to."""

    attr: str
    env: tuple[str, ...]
    default: Any
    kind: str  # "str" | "int" | "float" | "bool" | "path" | "list"
    help: str
    flag: str | None = None
    commands: tuple[str, ...] = SERVE_AND_NODE
    roles: tuple[str, ...] = ROLES
    section: str = ""


_DECLARED = "llmlb.setting"
# The conversion of a raw value (environment, .env, flag) follows the field's annotation.
_KINDS = {"str": "str", "str | None": "str", "int": "int", "int | None": "int",
          "float": "float", "bool": "bool", "Path": "path", "Path | None": "path",
          "tuple[str, ...]": "list", "tuple[Path, ...]": "list"}


def setting(env: str | tuple[str, ...], default: Any, help: str, *, flag: str | None = None,
            commands: tuple[str, ...] = SERVE_AND_NODE, roles: tuple[str, ...] | None = None,
            ) -> Any:
    """Declare a setting: the field of its section carries it. ``roles``: the roles that read
    it, when not its section's (``read_by``, else every role)."""
    names = (env,) if isinstance(env, str) else env
    return field(metadata={_DECLARED: (names, default, help, flag, commands, roles)})


# --- the sections ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerSettings:
    """The server itself: its role, its address, gunicorn's workers, what one request may
    hold."""

    role: str = setting(
        "LLMLB_ROLE", "standalone",
        "What this llmlb is: standalone (the balancer with an in-process node), balancer "
        "(routes to registered nodes, runs no model) or node (runs models for a balancer; "
        "what `llmlb node` starts).", flag="--role", commands=("serve",), roles=FRONT)
    host: str = setting("LLMLB_HOST", "127.0.0.1", "Address to listen on.", flag="--host")
    port: int = setting("LLMLB_PORT", 8080, "Port to listen on.", flag="--port")
    workers: int = setting(
        "LLMLB_WORKERS", 1,
        "gunicorn worker processes (each holds its own copy of the models it loads).",
        flag="--workers")
    threads: int = setting(
        "LLMLB_THREADS", 32,
        "Threads per worker (requests, streams and WebSockets each hold one).", flag="--threads")
    worker_class: str = setting(
        "LLMLB_WORKER_CLASS", None,
        "gunicorn worker class: gthread (threads; the default where models run) or gevent "
        "(the default of a balancer: thousands of streams per worker).", roles=FRONT)
    reuse_port: bool = setting(
        "LLMLB_REUSE_PORT", False,
        "Each gunicorn worker listens on a socket of its own (SO_REUSEPORT: the kernel spreads "
        "new connections over the workers) instead of all accepting from one shared socket. "
        "Another process of the same user may then bind the same port too (it shares the "
        "connections rather than failing to start).")
    dev: bool = setting(
        "LLMLB_DEV", False,
        "Development mode: accepts the API key sk_debug and the login admin/test. "
        "Never in production.", flag="--dev")
    log_level: str = setting("LLMLB_LOG_LEVEL", "INFO", "Log level.", flag="--log-level")
    max_body_bytes: int = setting("LLMLB_MAX_BODY_BYTES", 8 * 1024 * 1024,
                                  "Largest request body accepted (413 above).")
    trusted_proxies: int = setting(
        "LLMLB_TRUSTED_PROXIES", 0,
        "Reverse proxies in front of llmlb whose X-Forwarded-* headers are trusted "
        "(1 behind nginx).")
    max_websockets: int = setting(
        "LLMLB_MAX_WEBSOCKETS", None,
        "WebSockets open at once per worker (each holds a thread); more get 503. Must be "
        "below LLMLB_THREADS (default: half of it).", roles=FRONT)
    header_timeout_seconds: float = setting(
        "LLMLB_HEADER_TIMEOUT_SECONDS", 5.0,
        "Under gunicorn, a connection must send its request line and headers within this "
        "time once a thread takes it, or it is closed (slow clients cannot hold threads).")

    @property
    def concurrency(self) -> int:
        """Requests one worker may serve at once (its threads, or gevent's connections)."""
        return GEVENT_CONNECTIONS if self.worker_class == "gevent" else self.threads


@dataclass(frozen=True)
class FileSettings:
    """Where llmlb keeps its state, and where it finds its catalog and plugins."""

    home: Path = setting("LLMLB_HOME", "~/.llmlb",
                         "Directory for llmlb's state (SQLite database, .env, plugins).",
                         flag="--home", commands=("serve", "node", "models"))
    database: Path = setting("LLMLB_DATABASE", None,
                             "SQLite database file (default: $LLMLB_HOME/llmlb.db).",
                             flag="--database")
    database_url: str | None = setting(
        "LLMLB_DATABASE_URL", None,
        "PostgreSQL URL (postgresql://user:password@host/db) holding the shared state "
        "instead of the SQLite file, so that several balancers act as one.",
        flag="--database-url", commands=("serve",), roles=FRONT)
    database_pool_size: int | None = setting(
        "LLMLB_DATABASE_POOL_SIZE", None,
        "PostgreSQL connections each worker keeps at most (default: its threads, at most "
        "10); each worker also holds one to listen for changes and one for the leader "
        "lock.", roles=FRONT)
    database_timeout_seconds: float = setting(
        "LLMLB_DATABASE_TIMEOUT_SECONDS", 3.0,
        "Longest wait for PostgreSQL (connecting, a free pooled connection, a row lock); "
        "past it a request gets 503 state_unavailable.", roles=FRONT)
    endpoints_key: str | None = setting(
        "LLMLB_ENDPOINTS_KEY", None,
        "The key (Fernet, URL-safe base64) sealing endpoints' API keys in the database, "
        "written to $LLMLB_HOME/endpoints.key at start (default: that file, made on first "
        "use). Balancers sharing a PostgreSQL state need the same one, which the database "
        "never holds.", roles=FRONT)
    supported_models: Path = setting(
        "LLMLB_SUPPORTED_MODELS", None,
        "Catalog file (default: the supported_models.json shipped with llmlb).",
        flag="--supported-models", commands=("serve", "node", "models"))
    plugins_dir: tuple[Path, ...] = setting(
        "LLMLB_PLUGINS_DIR", None,
        "Directories of drop-in engine plugins, separated by ':' (default: the project's "
        "plugins/ and $LLMLB_HOME/plugins).")

    @property
    def metrics_dir(self) -> Path:
        """prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR), wiped at start."""
        return self.home / "metrics"


@dataclass(frozen=True)
class ModelSettings:
    """Where models live, where they may come from, and how long fetching them may take."""

    models_dir: Path = setting(
        ("XLLM_MODELS_DIR", "LLM_MODELS_DIR"), None,
        "Model directory (default: $LLMLB_HOME/models). LLM_MODELS_DIR is read for "
        "compatibility.", flag="--models-dir", commands=("serve", "node", "models"))
    shared_models_dir: Path | None = setting(
        "LLMLB_SHARED_MODELS_DIR", None,
        "Shared model directory (e.g. an NFS mount) served in place, never copied.",
        flag="--shared-models-dir", commands=("serve", "node", "models"))
    hf_token: str | None = setting("HF_TOKEN", None,
                                   "Hugging Face token for private or gated repositories.")
    hf_endpoint: str = setting("HF_ENDPOINT", "https://huggingface.co",
                               "Hugging Face endpoint (a mirror may stand in for the hub).")
    download_allowlist: tuple[str, ...] = setting(
        "LLMLB_DOWNLOAD_ALLOWLIST", None,
        "Hosts models may be downloaded from, comma-separated; a host also allows its "
        "subdomains, and a download follows redirects only to these hosts (default: the "
        "host of HF_ENDPOINT, with hf.co for huggingface.co, whose CDN serves its large "
        "files; 'none' disables downloads).")
    resolve_wait_seconds: float = setting(
        "LLMLB_RESOLVE_WAIT_SECONDS", 300.0,
        "How long a request waits for its model to download before a 503.")
    max_resolve_waiters: int = setting(
        "LLMLB_MAX_RESOLVE_WAITERS", 32,
        "Requests that may wait for downloads at once per process; more get a 503.")
    download_timeout_seconds: float = setting(
        "LLMLB_DOWNLOAD_TIMEOUT_SECONDS", 300.0,
        "A download with no progress for this long fails with download_failed.")
    hf_stats_ttl_seconds: float = setting(
        "LLMLB_HF_STATS_TTL_SECONDS", 3600.0,
        "How long Hugging Face download/like counts are cached.", roles=FRONT)
    hub_timeout_seconds: float = setting(
        "LLMLB_HUB_TIMEOUT_SECONDS", 2.0,
        "Timeout for Hugging Face API calls that only add information (stats).", roles=FRONT)

    @property
    def locks_dir(self) -> Path:
        return self.models_dir / ".locks"


@dataclass(frozen=True)
class InferenceSettings:
    """What one process runs at once: loaded models, their batches and queues, the size of a
    prompt."""

    keep_alive_seconds: float = setting("LLMLB_KEEP_ALIVE_SECONDS", 300.0,
                                        "Idle time after which a loaded model is unloaded.")
    max_loaded_models: int = setting(
        "LLMLB_MAX_LOADED_MODELS", 2,
        "Models kept loaded at once per process (least recently used is unloaded).")
    context_length: int = setting(
        "LLMLB_CONTEXT_LENGTH", 4096,
        "Largest context (prompt + answer, in tokens) of one request; the model's own "
        "limit wins when smaller. A batching model keeps room for this many tokens per "
        "sequence it decodes at once.")
    parallel_sequences: int | None = setting(
        "LLMLB_PARALLEL_SEQUENCES", None,
        "Requests one loaded model decodes together in a batch; more wait in its queue. "
        "Unset: GGUF and safetensors models get as many as the KV cache of each "
        "(LLMLB_CONTEXT_LENGTH tokens) fits in half the memory their weights leave free, "
        "1 to 8; ONNX takes 1.")
    max_prompt_chars: int = setting(
        "LLMLB_MAX_PROMPT_CHARS", 1_000_000,
        "Largest prompt in characters (all message contents together, or a completion's "
        "or embedding request's inputs); checked before tokenizing, 400 above.")
    max_messages: int = setting(
        "LLMLB_MAX_MESSAGES", 2048,
        "Most messages one chat request may hold; checked before tokenizing, 400 above.")
    max_queued_requests: int = setting(
        "LLMLB_MAX_QUEUED_REQUESTS", 16,
        "Requests that may wait for one busy model; more get a 503 with Retry-After.")


@dataclass(frozen=True)
class NodeSettings:
    """A node's link to its balancer: who it is there, where that is, its key."""

    balancer_url: str | None = setting(
        "LLMLB_BALANCER_URL", None,
        "Balancer a node registers with and may fetch model files through "
        "(/v1/models/blob/...); several balancers sharing one state, comma-separated: the "
        "node sends its heartbeats to the first that answers and moves on to the next when "
        "it fails.", flag="--balancer-url")
    node_api_key: str | None = setting(
        "LLMLB_NODE_API_KEY", None, "API key with the node scope, used against the balancer.")
    node_name: str = setting(
        "LLMLB_NODE_NAME", None,
        "This node's name at the balancer (default: the host name). Restarting with the "
        "same name keeps the node's identity.", flag="--name", commands=("node",))
    advertise_url: str = setting(
        "LLMLB_ADVERTISE_URL", None,
        "How the balancer reaches this node (default: http://<host>:<port>).",
        flag="--advertise-url", commands=("node",))

    @property
    def balancer_urls(self) -> tuple[str, ...]:
        """The balancers, in the order given."""
        return tuple(url for url in (self.balancer_url or "").split(",") if url)


@dataclass(frozen=True)
class ClusterSettings:
    """The balancer and its members: heartbeats, timeouts, cooldowns, routing, endpoints, the
    request history."""

    read_by: ClassVar[tuple[str, ...]] = FRONT  # a node reads only its heartbeat's

    heartbeat_seconds: float = setting(
        "LLMLB_HEARTBEAT_SECONDS", 5.0,
        "How often a node reports its hardware, models and load to the balancer.", roles=ROLES)
    node_timeout_seconds: float = setting(
        "LLMLB_NODE_TIMEOUT_SECONDS", 15.0,
        "A node without a heartbeat for this long is offline and gets no traffic.")
    cooldown_seconds: float = setting(
        "LLMLB_COOLDOWN_SECONDS", 1.0,
        "How long a node that failed a request gets no traffic; doubled for each failure "
        "in a row.")
    cooldown_max_seconds: float = setting(
        "LLMLB_COOLDOWN_MAX_SECONDS", 60.0,
        "The longest cooldown, also for a node's Retry-After.")
    affinity: bool = setting(
        "LLMLB_AFFINITY", True,
        "Send a request to the node that last served its prompt's prefix (a conversation's "
        "earlier turns, a long shared system prompt: its prompt cache is warm) while that "
        "node is within the load bound; a request with nothing cached anywhere goes to the "
        "least busy node.")
    affinity_load_factor: float = setting(
        "LLMLB_AFFINITY_LOAD_FACTOR", 1.25,
        "Load bound of affinity: a node takes a request for its warm prefix only while its "
        "requests in flight, this one counted, stay within ceil(factor x the average), and "
        "never while another node is idle.")
    proxy_connect_timeout_seconds: float = setting(
        "LLMLB_PROXY_CONNECT_TIMEOUT_SECONDS", 3.0,
        "Timeout for connecting to a node; past it the request goes to another.")
    proxy_read_timeout_seconds: float = setting(
        "LLMLB_PROXY_READ_TIMEOUT_SECONDS", 600.0,
        "Longest wait for a node's answer or its next streamed chunk.")
    endpoint_check_seconds: float = setting(
        "LLMLB_ENDPOINT_CHECK_SECONDS", 10.0,
        "How often the balancer asks each external endpoint for its models (GET "
        "{base_url}/models), its health and its load (its Prometheus /metrics, where it has "
        "one); a failed check makes it offline until one succeeds.")
    endpoint_max_requests: int = setting(
        "LLMLB_ENDPOINT_MAX_REQUESTS", 64,
        "Requests one external endpoint may hold at once (vLLM and Ollama accept and queue "
        "everything); more go to another candidate, or get 429 with Retry-After. 0: no "
        "limit.")
    endpoint_env_allowlist: tuple[str, ...] = setting(
        "LLMLB_ENDPOINT_ENV_ALLOWLIST", None,
        "Environment variables an endpoint's API key may be read from (--api-key-env), "
        "comma-separated, besides those named LLMLB_ENDPOINT_KEY_*; any other is refused.")
    key_lease_seconds: float = setting(
        "LLMLB_KEY_LEASE_SECONDS", 60.0,
        "A request of a key with --max-concurrent holds a lease on one of its slots, renewed "
        "every third of this while it runs; a process that dies holding one frees it after "
        "this long.")
    history_retention_days: float = setting(
        "LLMLB_HISTORY_RETENTION_DAYS", 7.0,
        "How long the request history (one row per request: time, key, model, node, "
        "status, latency, tokens) is kept; 0 keeps none.")
    responses_retention_days: float = setting(
        "LLMLB_RESPONSES_RETENTION_DAYS", 30.0,
        "Days a stored response of the Responses API (\"store\": true, the default) is "
        "kept for previous_response_id and GET /v1/responses/{id}.")


@dataclass(frozen=True)
class ProviderSettings:
    """The hosted providers a balancer sends ``openai:``, ``anthropic:`` and ``google:``
    model names to: their keys and where each key may go."""

    read_by: ClassVar[tuple[str, ...]] = FRONT

    openai_api_key: str | None = setting(
        "OPENAI_API_KEY", None,
        "OpenAI's API key: model names openai:<model> go to OpenAI with it (unset: such "
        "names are a 404 that says to set it). Sent only to OPENAI_BASE_URL.")
    openai_base_url: str = setting(
        "OPENAI_BASE_URL", "https://api.openai.com/v1",
        "Where openai:<model> requests go (a proxy, or a stand-in in tests).")
    anthropic_api_key: str | None = setting(
        "ANTHROPIC_API_KEY", None,
        "Anthropic's API key: model names anthropic:<model> go to Anthropic with it. Sent "
        "only to ANTHROPIC_BASE_URL.")
    anthropic_base_url: str = setting("ANTHROPIC_BASE_URL", "https://api.anthropic.com",
                                      "Where anthropic:<model> requests go.")
    google_api_key: str | None = setting(
        ("GOOGLE_API_KEY", "GEMINI_API_KEY"), None,
        "Google's Gemini API key: model names google:<model> go to the Gemini API with it. "
        "Sent only to GOOGLE_BASE_URL.")
    google_base_url: str = setting("GOOGLE_BASE_URL",
                                   "https://generativelanguage.googleapis.com",
                                   "Where google:<model> requests go.")
    provider_check_seconds: float = setting(
        "LLMLB_PROVIDER_CHECK_SECONDS", 3600.0,
        "How often the balancer asks each hosted provider it has a key for which models it "
        "has (listed in /v1/models as <provider>:<model>); any model name of the provider "
        "is sent on, listed or not.")


@dataclass(frozen=True)
class UserSettings:
    """The dashboard's users: the first admin, sessions, logins."""

    read_by: ClassVar[tuple[str, ...]] = FRONT

    admin_username: str = setting("LLMLB_ADMIN_USERNAME", "admin",
                                  "User name of the first admin, created at the first start.")
    admin_password: str | None = setting(
        "LLMLB_ADMIN_PASSWORD", None,
        "Password of the first admin (default: generated and printed once).")
    secret_key: str | None = setting(
        "LLMLB_SECRET_KEY", None,
        "Key signing dashboard sessions (default: generated once, kept in the database).")
    secure_cookies: bool = setting(
        "LLMLB_SECURE_COOKIES", False,
        "Mark the dashboard's session cookie Secure (HTTPS only); set it behind TLS.")
    session_lifetime_seconds: float = setting(
        "LLMLB_SESSION_LIFETIME_SECONDS", 28800.0,
        "How long a dashboard login lasts, from the moment of login (logging out or a "
        "password change ends it sooner).")
    login_max_failures: int = setting(
        "LLMLB_LOGIN_MAX_FAILURES", 5,
        "Failed dashboard logins allowed per client address and per user name within "
        "LLMLB_LOGIN_WINDOW_SECONDS; more get 429.")
    login_window_seconds: float = setting("LLMLB_LOGIN_WINDOW_SECONDS", 900.0,
                                          "The window in which failed logins are counted.")


SECTIONS: dict[str, type] = {
    "server": ServerSettings, "files": FileSettings, "models": ModelSettings,
    "inference": InferenceSettings, "node": NodeSettings, "cluster": ClusterSettings,
    "providers": ProviderSettings, "users": UserSettings,
}


def _options() -> tuple[Option, ...]:
    found = []
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            env, default, help_text, flag, commands, roles = f.metadata[_DECLARED]
            roles = roles or getattr(cls, "read_by", ROLES)
            kind = _KINDS[str(f.type)]  # a KeyError here: a type the loader cannot read
            found.append(Option(f.name, env, default, kind, help_text, flag, commands, roles,
                                section))
    return tuple(found)


OPTIONS: tuple[Option, ...] = _options()
OPTIONS_BY_ATTR = {o.attr: o for o in OPTIONS}
# Flat name -> its section: every setting, and what a section derives from them.
_SECTION_OF = {**{o.attr: o.section for o in OPTIONS}, "concurrency": "server",
               "metrics_dir": "files", "locks_dir": "models", "balancer_urls": "node"}


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    server: ServerSettings
    files: FileSettings
    models: ModelSettings
    inference: InferenceSettings
    node: NodeSettings
    cluster: ClusterSettings
    providers: ProviderSettings
    users: UserSettings
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __getattr__(self, name: str) -> Any:
        """A setting by its flat name (``settings.port``): scripts' and tests' way in."""
        section = _SECTION_OF.get(name)
        if section is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(getattr(self, section), name)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], sources: dict[str, str]) -> Settings:
        """Settings from flat values (one per option)."""
        sections = {name: section(**{f.name: values[f.name] for f in fields(section)})
                    for name, section in SECTIONS.items()}
        return cls(**sections, sources=sources)


# --- loading --------------------------------------------------------------------------------

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
    """Build Settings from the layers; ``overrides`` are CLI flags (or a test's config), by
    the settings' flat names."""
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
        hub_host = urlsplit(values["hf_endpoint"]).hostname or ""
        values["download_allowlist"] = (hub_host, *HUB_CDN_HOSTS.get(hub_host, ()))
    elif values["download_allowlist"] == ("none",):
        values["download_allowlist"] = ()
    values["endpoint_env_allowlist"] = values["endpoint_env_allowlist"] or ()
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
    if values["admin_password"] and \
            len(values["admin_password"]) < MIN_PASSWORD_LENGTH:
        raise SettingsError(f"LLMLB_ADMIN_PASSWORD must have at least {MIN_PASSWORD_LENGTH} "
                            "characters")
    _cluster_values(values, sources)
    _database_values(values)
    return Settings.from_values(values, sources)


def _database_values(values: dict[str, Any]) -> None:
    url = values["database_url"]
    if url is not None:
        if urlsplit(url).scheme not in ("postgresql", "postgres"):
            raise SettingsError("LLMLB_DATABASE_URL must be a postgresql:// URL")
        if values["role"] == "node":
            raise SettingsError("LLMLB_DATABASE_URL is for balancers: a node keeps its own "
                                "state in its SQLite file")
    if values["database_pool_size"] is None:
        concurrency = values["threads"] if values["worker_class"] == "gthread" else 10
        values["database_pool_size"] = min(10, concurrency)
    elif values["database_pool_size"] < 1:
        raise SettingsError("LLMLB_DATABASE_POOL_SIZE must be at least 1")


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
        if values[attr] is None:
            continue
        checked = []
        # Several balancers, comma-separated (a node's LLMLB_BALANCER_URL only).
        for url in values[attr].split(",") if attr == "balancer_url" else [values[attr]]:
            try:
                checked.append(check_url(url.strip()))
            except BadURL as exc:
                raise SettingsError(f"{OPTIONS_BY_ATTR[attr].env[0]} {exc}, not "
                                    f"{url.strip()!r}") from None
        values[attr] = ",".join(checked)
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
