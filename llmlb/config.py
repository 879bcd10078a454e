"""The one Settings object: defaults < ``$LLMLB_HOME/.env`` < environment < CLI flags.

Every setting is declared once in ``OPTIONS``; the CLI flags, ``--help`` texts, the README's
table and the loader all read that table, so a setting cannot exist in one place only.
"""

from __future__ import annotations

import dataclasses
import os
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
    flag: str | None = None  # CLI flag of `llmlb serve`, when it has one


OPTIONS: tuple[Option, ...] = (
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
           "Balancer this node may fetch model files through (/v1/models/blob/...).",
           "--balancer-url"),
    Option("node_api_key", ("LLMLB_NODE_API_KEY",), None, "str",
           "API key with the node scope, used against the balancer."),
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
           "Largest context (prompt + answer, in tokens) a model is loaded with; the model's "
           "own limit wins when smaller."),
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
    home: Path
    models_dir: Path
    database: Path
    host: str
    port: int
    workers: int
    threads: int
    dev: bool
    log_level: str
    supported_models: Path
    shared_models_dir: Path | None
    hf_token: str | None
    hf_endpoint: str
    download_allowlist: tuple[str, ...]
    balancer_url: str | None
    node_api_key: str | None
    resolve_wait_seconds: float
    max_resolve_waiters: int
    download_timeout_seconds: float
    keep_alive_seconds: float
    max_loaded_models: int
    context_length: int
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
                 "login_max_failures"):
        if values[name] < 1:
            raise SettingsError(f"{OPTIONS_BY_ATTR[name].env[0]} must be at least 1")
    # A WebSocket holds a worker thread for its whole life: some threads must stay free
    # for requests, whatever the number of sockets clients open.
    if values["max_websockets"] is None:
        values["max_websockets"] = values["threads"] // 2
    elif values["max_websockets"] >= values["threads"]:
        raise SettingsError(f"LLMLB_MAX_WEBSOCKETS ({values['max_websockets']}) must be below "
                            f"LLMLB_THREADS ({values['threads']})")
    return Settings(**values, sources=sources)


def default_catalog_path() -> Path:
    """The catalog shipped with llmlb: the repository's file, or the installed data file."""
    in_repo = PROJECT_ROOT / "supported_models.json"
    if in_repo.is_file():
        return in_repo
    import sys

    return Path(sys.prefix) / "share" / "llmlb" / "supported_models.json"
