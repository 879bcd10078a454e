"""The ``llmlb`` command: ``serve``, ``node``, ``keys``, ``endpoints``, ``aliases``, ``users``,
``db``, ``models``."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .config import OPTIONS, SECTIONS, SettingsError, load_settings

_TYPES = {"int": int, "float": float, "str": str, "path": click.Path(), "list": str}


def _env_help(command: str | None = None) -> str:
    """The settings a command reads beyond its flags: for ``llmlb --help`` every setting
    (ST-9), for ``serve`` every one without a serve flag, for ``node`` those a node reads
    (not a balancer's users, dashboard or routing) without a node flag."""
    import textwrap

    if command is None:
        options, title = OPTIONS, "Settings (defaults < $LLMLB_HOME/.env < environment < flags):"
    else:
        role = "node" if command == "node" else None
        options = tuple(o for o in OPTIONS if (role is None or role in o.roles)
                        and not (o.flag and command in o.commands))
        title = ("More settings, from the environment or $LLMLB_HOME/.env (defaults < .env < "
                 "environment < flags):")
    # "\b" keeps click from re-wrapping the block below it.
    lines = [title, "", "\b"]
    section = None
    for o in options:
        if o.section != section:
            section = o.section
            lines.append(f"{section}: {' '.join((SECTIONS[section].__doc__ or '').split())}")
        lines.append(f"  {' / '.join(o.env)}")
        lines.extend(textwrap.wrap(o.help, 90, initial_indent="      ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


def settings_flags(command: Any, for_command: str = "serve") -> Any:
    """Add a flag for every setting that has one for ``for_command``, with the setting's help
    and environment names."""
    for option in reversed(OPTIONS):
        if option.flag is None or for_command not in option.commands:
            continue
        help_text = f"{option.help} [env: {', '.join(option.env)}]"
        if option.kind == "bool":
            command = click.option(option.flag, option.attr, is_flag=True, default=None,
                                   help=help_text)(command)
        else:
            command = click.option(option.flag, option.attr, type=_TYPES[option.kind],
                                   default=None, help=help_text)(command)
    return command


def node_flags(command: Any) -> Any:
    return settings_flags(command, "node")


def _settings(flags: dict[str, Any]):
    try:
        return load_settings(flags)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


@click.group(epilog=_env_help(), context_settings={"max_content_width": 100})
@click.version_option(package_name="llmlb")
def main() -> None:
    """llmlb: an OpenAI-compatible LLM load balancer and node runtime.

    `llmlb serve` starts it standalone (balancer and node in one process) on port 8080;
    `llmlb serve --role balancer` and `llmlb node --balancer-url URL` spread it over machines.
    """


def _run(settings: Any) -> None:
    from . import create_app
    from .catalog import CatalogError
    from .config import SettingsError
    from .server import preflight
    from .server import serve as run

    try:
        preflight(settings)
    except CatalogError as exc:
        raise click.ClickException(f"the model catalog is invalid: {exc}") from None
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    run(settings, lambda: create_app(settings))


@main.command(epilog=_env_help("serve"), context_settings={"max_content_width": 100})
@settings_flags
def serve(**flags: Any) -> None:
    """Start llmlb: standalone (the OpenAI API, the model hub and dashboard, and a node in one
    process) or, with --role balancer, a balancer in front of `llmlb node` processes."""
    _run(_settings(flags))


@main.command(epilog=_env_help("node"), context_settings={"max_content_width": 100})
@node_flags
def node(**flags: Any) -> None:
    """Start a node: it runs models for the balancer at --balancer-url, registers there with
    LLMLB_NODE_API_KEY (a key with the node scope) and reports every LLMLB_HEARTBEAT_SECONDS.
    It listens on port 8081 unless told otherwise."""
    _run(_settings({**flags, "role": "node"}))


# --- keys ---------------------------------------------------------------------------------------

@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


def _db(home: str | None, database: str | None):
    """The state this llmlb uses (LLMLB_DATABASE_URL, else the SQLite file)."""
    from .private_files import private_dir
    from .state import StateUnavailable, open_state

    settings = _settings({"home": home, "database": database})
    private_dir(settings.files.home)
    try:
        return open_state(settings.files)
    except StateUnavailable as exc:
        raise click.ClickException(str(exc)) from None


_db_flags = [click.option("--home", default=None, help="LLMLB_HOME to use."),
             click.option("--database", default=None, help="Database file to use.")]


def db_flags(command: Any) -> Any:
    for flag in reversed(_db_flags):
        command = flag(command)
    return command


_limit_flags = [
    click.option("--rpm", type=int, default=None, help="Requests per minute (0: no limit)."),
    click.option("--tpm", type=int, default=None, help="Tokens per minute (0: no limit)."),
    click.option("--max-concurrent", type=int, default=None,
                 help="Requests at once (0: no limit)."),
    click.option("--daily-tokens", type=int, default=None,
                 help="Tokens per UTC day (0: no limit)."),
    click.option("--monthly-tokens", type=int, default=None,
                 help="Tokens per UTC month (0: no limit)."),
    click.option("--models", default=None,
                 help="Comma-separated model ids the key may use ('' : any)."),
]


def limit_flags(command: Any) -> Any:
    for flag in reversed(_limit_flags):
        command = flag(command)
    return command


def _given_limits(flags: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flags.items() if v is not None}


def _describe_limits(limits: Any) -> str:
    shown = [f"{k}={','.join(v) if isinstance(v, list) else v}"
             for k, v in limits.as_dict().items() if v is not None]
    return " ".join(shown) or "no limits"


@keys.command("create")
@click.option("--name", required=True, help="What the key is for (shown in listings).")
@click.option("--scope", "scopes", default="api", show_default=True,
              help="Comma-separated scopes: api (inference), node (model sync), admin.")
@limit_flags
@db_flags
def keys_create(name: str, scopes: str, home: str | None, database: str | None,
                **limits: Any) -> None:
    """Create a key and print it once (it is stored hashed)."""
    from .auth import create_api_key
    from .limits import parse_limits

    try:
        key, record = create_api_key(_db(home, database), name, scopes,
                                     parse_limits(_given_limits(limits)))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(key)
    click.echo(f"Created key {record.id} '{name}' with scopes {','.join(record.scopes)} "
               f"({_describe_limits(record.limits)}). It is shown only this once.", err=True)


@keys.command("update")
@click.argument("key_id", type=int)
@limit_flags
@db_flags
def keys_update(key_id: int, home: str | None, database: str | None, **limits: Any) -> None:
    """Change a key's limits: the flags given (0, or '' for --models, removes one)."""
    from .auth import get_api_key, set_key_limits
    from .limits import parse_limits

    db = _db(home, database)
    current = get_api_key(db, key_id)
    if current is None or current.revoked:
        raise click.ClickException(f"no active key with id {key_id}")
    try:
        wanted = parse_limits(_given_limits(limits), current.limits)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    record = set_key_limits(db, key_id, wanted)
    if record is None:
        raise click.ClickException(f"no active key with id {key_id}")
    click.echo(f"Key {key_id} '{record.name}': {_describe_limits(record.limits)}")


@keys.command("list")
@db_flags
def keys_list(home: str | None, database: str | None) -> None:
    """List keys (never their secret), with their limits."""
    from .auth import list_api_keys

    for k in list_api_keys(_db(home, database)):
        state = "revoked" if k.revoked else "active"
        click.echo(f"{k.id}\t{k.prefix}…\t{k.name}\t{','.join(k.scopes)}\t{state}\t"
                   f"{_describe_limits(k.limits)}")


@keys.command("revoke")
@click.argument("key_id", type=int)
@db_flags
def keys_revoke(key_id: int, home: str | None, database: str | None) -> None:
    """Revoke a key by its id."""
    from .auth import revoke_api_key

    if not revoke_api_key(_db(home, database), key_id):
        raise click.ClickException(f"no active key with id {key_id}")
    click.echo(f"Revoked key {key_id}")


# --- endpoints -------------------------------------------------------------------------------

@main.group()
def endpoints() -> None:
    """Add, list and remove external OpenAI-compatible servers (vLLM, llama-server, Ollama,
    SGLang, another llmlb, a hosted API) the balancer routes to like to its nodes. Run on the
    balancer's machine with its LLMLB_HOME: this writes its database, and the running balancer
    picks the change up within a second."""


def _registry(home: str | None, database: str | None):  # noqa: ANN202 - (settings, registry)
    from .balancer.registry import NodeRegistry

    settings = _settings({"home": home, "database": database})
    db = _db(home, database)
    return settings, NodeRegistry(db, timeout=settings.cluster.node_timeout_seconds,
                                  cooldown=settings.cluster.cooldown_seconds,
                                  cooldown_max=settings.cluster.cooldown_max_seconds)


@endpoints.command("add")
@click.argument("name")
@click.argument("base_url")
@click.option("--api-key-env", default=None, metavar="VAR",
              help="Environment variable holding the endpoint's API key, read by the balancer "
              "from ITS environment (only the name is stored); named LLMLB_ENDPOINT_KEY_* or "
              "listed in LLMLB_ENDPOINT_ENV_ALLOWLIST.")
@click.option("--api-key-stdin", is_flag=True, help="Read the API key from standard input; "
              "it is stored encrypted with $LLMLB_HOME/endpoints.key.")
@db_flags
def endpoints_add(name: str, base_url: str, api_key_env: str | None, api_key_stdin: bool,
                  home: str | None, database: str | None) -> None:
    """Add an endpoint after checking that BASE_URL answers GET BASE_URL/models (a BASE_URL
    without a path means BASE_URL/v1). The balancer uses it once its own check passes."""
    from .balancer.credentials import EnvAllowlist
    from .balancer.endpoints import add_endpoint, endpoint_spec, instance_id
    from .balancer.reports import model_ids
    from .errors import APIError

    settings, registry = _registry(home, database)
    api_key = sys.stdin.readline().strip() if api_key_stdin else None
    try:
        spec = endpoint_spec({"name": name, "base_url": base_url, "api_key": api_key,
                              "api_key_env": api_key_env},
                             EnvAllowlist(settings.cluster.endpoint_env_allowlist))
        record = add_endpoint(registry, settings.files.home, spec,
                              check_seconds=settings.cluster.endpoint_check_seconds,
                              timeout=max(2.0, settings.cluster.proxy_connect_timeout_seconds),
                              instance=instance_id(registry.db), in_balancer=False)
    except APIError as exc:
        raise click.ClickException(exc.message) from None
    models = ", ".join(model_ids(record.report.models)) or "none seen yet"
    click.echo(f"Added endpoint {name} ({record.url}); models: {models}.")
    if api_key_env:
        shell = "checked with this shell's" if os.environ.get(api_key_env) else \
            "not checked: this shell has no"
        click.echo(f"Its API key: {shell} {api_key_env}. The balancer reads {api_key_env} from "
                   f"its OWN environment (its service's, not this shell's).")
    click.echo(f"The balancer routes to it once its own check passes (within "
               f"{settings.cluster.endpoint_check_seconds:g} s); `llmlb endpoints list` shows its "
               f"status and, if it fails, why.")


@endpoints.command("list")
@db_flags
def endpoints_list(home: str | None, database: str | None) -> None:
    """List endpoints: name, base URL, status, API key (never the key itself), models, and
    the last check's error."""
    import time

    from .balancer.registry import ENDPOINT
    from .balancer.reports import EndpointReport, model_ids

    settings, registry = _registry(home, database)
    now = time.time()
    rows = [("NAME", "BASE_URL", "STATUS", "KEY", "MODELS", "LAST_CHECK_ERROR")]
    for r in registry.nodes(fresh=True):
        if r.kind != ENDPOINT:
            continue
        key = ("env:" + r.credential[4:] if r.credential.startswith("env:") else "stored") \
            if r.credential else "none"
        error = r.unusable or (r.report.error if isinstance(r.report, EndpointReport)
                               else None)
        rows.append((r.name, r.url, r.status(now, settings.cluster.node_timeout_seconds), key,
                     ",".join(model_ids(r.report.models)) or "-", error or "-"))
    for row in rows:
        click.echo("\t".join(row))


@endpoints.command("remove")
@click.argument("name")
@db_flags
def endpoints_remove(name: str, home: str | None, database: str | None) -> None:
    """Remove an endpoint by name."""
    from .balancer.registry import ENDPOINT

    _, registry = _registry(home, database)
    record = registry.get(name)
    if record is None or record.kind != ENDPOINT:
        raise click.ClickException(f"no endpoint named {name}")
    registry.remove(name)
    click.echo(f"Removed endpoint {name}")


# --- aliases ---------------------------------------------------------------------------------

@main.group()
def aliases() -> None:
    """Model aliases: a name agents use (claude-sonnet-4-5, gpt-4o) standing for a list of
    models; the first that can serve answers, the next when one fails before answering. Run
    on the balancer's machine with its LLMLB_HOME (or LLMLB_DATABASE_URL); every worker sees
    a change at once."""


def _aliases(home: str | None, database: str | None):  # noqa: ANN202 - Aliases
    from .aliases import Aliases

    return Aliases(_db(home, database))


@aliases.command("set")
@click.argument("name")
@click.argument("models", nargs=-1, required=True)
@db_flags
def aliases_set(name: str, models: tuple[str, ...], home: str | None,
                database: str | None) -> None:
    """Make NAME stand for MODELS (in the order they are tried); replaces what it stood for."""
    from .aliases import alias_spec
    from .errors import APIError

    try:
        name, targets = alias_spec(name, list(models))
    except APIError as exc:
        raise click.ClickException(exc.message) from None
    _aliases(home, database).set(name, targets)
    click.echo(f"{name} -> {', '.join(targets)}")


@aliases.command("list")
@db_flags
def aliases_list(home: str | None, database: str | None) -> None:
    """List aliases: name, then the models in order."""
    for name, targets in _aliases(home, database).all().items():
        click.echo(f"{name}\t{','.join(targets)}")


@aliases.command("remove")
@click.argument("name")
@db_flags
def aliases_remove(name: str, home: str | None, database: str | None) -> None:
    """Remove an alias."""
    if not _aliases(home, database).remove(name.lower()):
        raise click.ClickException(f"no alias named {name}")
    click.echo(f"Removed alias {name}")


# --- users --------------------------------------------------------------------------------------

@main.group()
def users() -> None:
    """Create, list and delete dashboard users (every user is an admin), and set passwords.
    Passwords need at least 8 characters."""


def _user_change(change: Any, *args: Any) -> Any:
    from .auth import UserError

    try:
        return change(*args)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None


@users.command("create")
@click.argument("username")
@click.password_option()
@db_flags
def users_create(username: str, password: str, home: str | None, database: str | None) -> None:
    """Create a user (an admin) with a password."""
    from .auth import create_user

    if not _user_change(create_user, _db(home, database), username, password):
        raise click.ClickException(f"a user named '{username}' exists already (set its "
                                   f"password with: llmlb users set-password {username})")
    click.echo(f"Created user {username}")


@users.command("set-password")
@click.argument("username")
@click.password_option()
@db_flags
def users_set_password(username: str, password: str, home: str | None,
                       database: str | None) -> None:
    """Set an existing user's password; every session of the user ends."""
    from .auth import set_password

    if not _user_change(set_password, _db(home, database), username, password):
        raise click.ClickException(f"no user named '{username}' (llmlb users list shows "
                                   f"them; llmlb users create {username} adds one)")
    click.echo(f"Password set for {username}")


@users.command("list")
@db_flags
def users_list(home: str | None, database: str | None) -> None:
    """List users: name and creation time."""
    import time

    from .auth import list_users

    click.echo("USERNAME\tCREATED")
    for user in list_users(_db(home, database)):
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(user.created_at))
        click.echo(f"{user.username}\t{created}")


@users.command("delete")
@click.argument("username")
@db_flags
def users_delete(username: str, home: str | None, database: str | None) -> None:
    """Delete a user (their sessions end); the last user cannot be deleted."""
    from .auth import delete_user

    if not _user_change(delete_user, _db(home, database), username):
        raise click.ClickException(f"no user named '{username}'")
    click.echo(f"Deleted user {username}")


# --- db -----------------------------------------------------------------------------------------

@main.group("db")
def database_group() -> None:
    """The state's database."""


@database_group.command("copy")
@click.option("--to", "to_url", required=True, metavar="URL",
              help="The PostgreSQL database to copy into (postgresql://user@host/db).")
@click.option("--force", is_flag=True, help="Replace whatever the target already holds.")
@db_flags
def db_copy(to_url: str, force: bool, home: str | None, database: str | None) -> None:
    """Copy the SQLite state (keys, users, history, nodes, endpoints, pulls, settings) into
    PostgreSQL, for balancers started with LLMLB_DATABASE_URL=URL. Stop the balancer first:
    what it writes meanwhile would not be copied."""
    from .state import StateUnavailable, open_database
    from .state.copy import TargetNotEmpty, copy_state
    from .state.postgres import describe_url

    if not to_url.startswith(("postgresql://", "postgres://")):
        raise click.UsageError("--to must be a postgresql:// URL")
    settings = _settings({"home": home, "database": database})
    if not settings.files.database.is_file():
        raise click.ClickException(f"no SQLite database at {settings.files.database}")
    source = open_database(settings.files.database)
    try:
        target = open_database(to_url)
    except StateUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    try:
        counts = copy_state(source, target, force=force)
    except TargetNotEmpty as exc:
        raise click.ClickException(f"{describe_url(to_url)} already holds state (in "
                                   f"{exc}); --force replaces it") from None
    finally:
        source.close()
        target.close()
    click.echo(f"Copied {settings.files.database} to {describe_url(to_url)}: " + ", ".join(
        f"{n} {table}" for table, n in counts.items() if n))
    key_file = settings.files.home / "endpoints.key"
    if key_file.exists():
        click.echo(f"Endpoints' API keys stay sealed with {key_file}: give every balancer that "
                   "file, or its content as LLMLB_ENDPOINTS_KEY.", err=True)


# --- models -------------------------------------------------------------------------------------

@main.group()
def models() -> None:
    """Inspect models on disk and the catalog."""


def models_flags(command: Any) -> Any:
    return settings_flags(command, "models")


@models.command("list")
@models_flags
def models_list(**flags: Any) -> None:
    """List servable models (local and shared) with their format and size."""
    from .plugins import EngineRegistry, load_plugins
    from .storage import merged_listing

    settings = _settings(flags)
    table = EngineRegistry(load_plugins(settings.files.plugins_dir)).format_table()
    for m in merged_listing([(settings.models.models_dir, "local"),
                             (settings.models.shared_models_dir, "shared")], table):
        click.echo(f"{m.id}\t{m.format}\t{m.size_bytes / 1e6:.1f} MB\t{m.source}\t{m.path}")


@models.command("check-catalog")
@models_flags
def models_check_catalog(**flags: Any) -> None:
    """Validate the catalog file and print its models."""
    from .catalog import CatalogError, load_catalog

    settings = _settings(flags)
    try:
        catalog = load_catalog(settings.files.supported_models)
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from None
    for m in catalog.values():
        click.echo(f"{m.id}\t{m.source}\t{m.repo_id}\t{m.size_bytes / 1e6:.1f} MB")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
