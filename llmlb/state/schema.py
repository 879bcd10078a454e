"""The schema of the shared state, as versioned migrations for each engine.

SQLite keeps its version in ``PRAGMA user_version``; PostgreSQL in the one-row table
``schema_version``. Both are applied at start under a lock (a file lock; an advisory lock),
so balancers and workers starting together migrate once. A migration is appended, never
edited: a database at any earlier version upgrades in place. Both engines hold the same
tables and columns (``TABLES``), which is what ``llmlb db copy`` moves.
"""

from __future__ import annotations

# The counts of a usage roll-up row (``state/usage.py``), after its key (the hour or day, key
# name, model, node): sums, then histograms of latency and of time to first token, 16
# buckets each (``state.usage.BOUNDS_MS``). Fixed by the migration that made them.
USAGE_COUNTS = ("requests", "errors", "tokens_in", "tokens_out", "ttft_count",
                *(f"lat{i}" for i in range(16)), *(f"ttft{i}" for i in range(16)))


def _usage_tables(if_not_exists: str, integer: str) -> str:
    counts = "".join(f"        {c} {integer} NOT NULL DEFAULT 0,\n" for c in USAGE_COUNTS)
    return "".join(
        f"CREATE TABLE {if_not_exists}{table} (\n        {bucket} {integer} NOT NULL,\n"
        f"        key_name TEXT NOT NULL,\n        model TEXT NOT NULL,\n"
        f"        node TEXT NOT NULL,\n{counts}"
        f"        PRIMARY KEY ({bucket}, key_name, model, node)\n    );\n    "
        for table, bucket in (("usage_hourly", "hour"), ("usage_daily", "day")))


def _usage_by_tables(integer: str) -> str:
    """The roll-ups summed once more per key, per model, per node and in all (``dim`` 'key',
    'model', 'node', 'all'; ``value`` the key's name, the model, the node, ''), filled from
    the roll-ups there are: what a view grouped by one of them reads, a row per point."""
    counts = "".join(f"        {c} {integer} NOT NULL DEFAULT 0,\n" for c in USAGE_COUNTS)
    sums = ", ".join(f"SUM({c})" for c in USAGE_COUNTS)
    out = []
    for table, bucket in (("usage_hourly", "hour"), ("usage_daily", "day")):
        out.append(f"CREATE TABLE {table}_by (\n        {bucket} {integer} NOT NULL,\n"
                   f"        dim TEXT NOT NULL,\n        value TEXT NOT NULL,\n{counts}"
                   f"        PRIMARY KEY (dim, {bucket}, value)\n    );\n    ")
        for dim, column in (("key", "key_name"), ("model", "model"), ("node", "node"),
                            ("all", "''")):
            group = f", {column}" if dim != "all" else ""
            out.append(f"INSERT INTO {table}_by ({bucket}, dim, value, "
                       f"{', '.join(USAGE_COUNTS)}) SELECT {bucket}, '{dim}', {column}, {sums} "
                       f"FROM {table} GROUP BY {bucket}{group};\n    ")
    return "".join(out)


SQLITE: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS api_keys (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_used_at REAL,
        revoked_at REAL
    );
    CREATE TABLE IF NOT EXISTS users (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS registrations (
        model_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        error TEXT,
        requested_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at REAL NOT NULL,
        payload TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE IF NOT EXISTS hf_stats (
        repo_id TEXT PRIMARY KEY,
        downloads INTEGER,
        likes INTEGER,
        ok INTEGER NOT NULL,
        fetched_at REAL NOT NULL,
        claimed_at REAL
    );
    """,
    # Sessions end server-side (logout, new password); logins are throttled (sessions.py,
    # logins.py).
    """
    ALTER TABLE users ADD COLUMN session_version INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE IF NOT EXISTS login_failures (key TEXT NOT NULL, at REAL NOT NULL);
    CREATE INDEX IF NOT EXISTS login_failures_key_at ON login_failures(key, at);
    """,
    # The balancer's registry: nodes (and, later, endpoints) by name, their last report and
    # cooldown; which node pulls a model nobody has yet (one pull per model per cluster).
    """
    CREATE TABLE IF NOT EXISTS nodes (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL DEFAULT 'node',
        url TEXT NOT NULL,
        secret TEXT,
        report TEXT NOT NULL DEFAULT '{}',
        registered_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        cooldown_until REAL NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE TABLE IF NOT EXISTS pulls (
        model_id TEXT PRIMARY KEY,
        node_id INTEGER NOT NULL,
        assigned_at REAL NOT NULL
    );
    ALTER TABLE registrations ADD COLUMN node TEXT;
    """,
    # External endpoints are rows of ``nodes`` (kind 'endpoint') whose API key is kept as a
    # credential: "env:NAME" or "fernet:TOKEN" (balancer/credentials.py). One row per
    # request served (history.py), written in batches.
    """
    ALTER TABLE nodes ADD COLUMN credential TEXT;
    CREATE TABLE IF NOT EXISTS requests (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        key_name TEXT,
        operation TEXT NOT NULL,
        model TEXT,
        node TEXT,
        status INTEGER NOT NULL,
        stream INTEGER NOT NULL DEFAULT 0,
        latency_ms REAL NOT NULL,
        ttft_ms REAL,
        tokens_in INTEGER,
        tokens_out INTEGER,
        error TEXT
    );
    CREATE INDEX IF NOT EXISTS requests_at ON requests(at);
    """,
    # /ws/models events are derived from the shared state by a watcher (events.py), never
    # stored: the events table was never read or written.
    """
    DROP TABLE IF EXISTS events;
    """,
    # What changed, per topic (keys, users): every worker's cache compares these counters
    # (read only when SQLite says another connection committed) before trusting itself.
    """
    CREATE TABLE IF NOT EXISTS changes (topic TEXT PRIMARY KEY, version INTEGER NOT NULL);
    """,
    # The agents' APIs (agents.py): stored responses of the Responses API, with the whole
    # input each answered (previous_response_id continues from it); model aliases.
    """
    CREATE TABLE IF NOT EXISTS responses (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        model TEXT,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        input TEXT NOT NULL,
        response TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS responses_expires_at ON responses(expires_at);
    CREATE TABLE IF NOT EXISTS aliases (
        name TEXT PRIMARY KEY,
        models TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # Per-key limits (limits.py): columns of the key, read with it. Counters per key and
    # window, and leases of the requests at once, kept in the state so that every worker and
    # balancer counts the same; usage rolled up per hour (and per day), key, model and node as
    # the history is written (usage.py), latency and time to first token as histograms (columns lat0..,
    # ttft0.., state.usage.BOUNDS_MS).
    """
    ALTER TABLE api_keys ADD COLUMN rpm INTEGER;
    ALTER TABLE api_keys ADD COLUMN tpm INTEGER;
    ALTER TABLE api_keys ADD COLUMN max_concurrent INTEGER;
    ALTER TABLE api_keys ADD COLUMN daily_tokens INTEGER;
    ALTER TABLE api_keys ADD COLUMN monthly_tokens INTEGER;
    ALTER TABLE api_keys ADD COLUMN models TEXT;
    CREATE TABLE IF NOT EXISTS key_counters (
        key_id INTEGER NOT NULL,
        span TEXT NOT NULL,
        starts REAL NOT NULL,
        ends REAL NOT NULL,
        used INTEGER NOT NULL,
        PRIMARY KEY (key_id, span)
    );
    CREATE TABLE IF NOT EXISTS key_leases (
        id INTEGER PRIMARY KEY,
        key_id INTEGER NOT NULL,
        expires REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS key_leases_key ON key_leases(key_id, expires);
    """ + _usage_tables("IF NOT EXISTS ", "INTEGER") + """
    """,
    # Usage per key, per model, per node and in all, beside the roll-ups (version 10).
    _usage_by_tables("INTEGER"),
)

# PostgreSQL starts at SQLite's version 7, in its own types: ids are identity columns,
# times double precision. Its cross-worker notices are LISTEN/NOTIFY, not a table.
POSTGRES: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE api_keys (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        last_used_at DOUBLE PRECISION,
        revoked_at DOUBLE PRECISION
    );
    CREATE TABLE users (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        session_version INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE registrations (
        model_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        error TEXT,
        requested_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        node TEXT
    );
    CREATE TABLE hf_stats (
        repo_id TEXT PRIMARY KEY,
        downloads BIGINT,
        likes BIGINT,
        ok INTEGER NOT NULL,
        fetched_at DOUBLE PRECISION NOT NULL,
        claimed_at DOUBLE PRECISION
    );
    CREATE TABLE login_failures (key TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
    CREATE INDEX login_failures_key_at ON login_failures(key, at);
    CREATE TABLE nodes (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL DEFAULT 'node',
        url TEXT NOT NULL,
        secret TEXT,
        report TEXT NOT NULL DEFAULT '{}',
        registered_at DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        cooldown_until DOUBLE PRECISION NOT NULL DEFAULT 0,
        last_error TEXT,
        credential TEXT
    );
    CREATE TABLE pulls (
        model_id TEXT PRIMARY KEY,
        node_id BIGINT NOT NULL,
        assigned_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE requests (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        key_name TEXT,
        operation TEXT NOT NULL,
        model TEXT,
        node TEXT,
        status INTEGER NOT NULL,
        stream INTEGER NOT NULL DEFAULT 0,
        latency_ms DOUBLE PRECISION NOT NULL,
        ttft_ms DOUBLE PRECISION,
        tokens_in INTEGER,
        tokens_out INTEGER,
        error TEXT
    );
    CREATE INDEX requests_at ON requests(at);
    """,
    # SQLite's version 8.
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        model TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        input TEXT NOT NULL,
        response TEXT NOT NULL
    );
    CREATE INDEX responses_expires_at ON responses(expires_at);
    CREATE TABLE aliases (
        name TEXT PRIMARY KEY,
        models TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
    # Per-key limits, their counters and leases, usage roll-ups (SQLite's version 9).
    """
    ALTER TABLE api_keys ADD COLUMN rpm BIGINT;
    ALTER TABLE api_keys ADD COLUMN tpm BIGINT;
    ALTER TABLE api_keys ADD COLUMN max_concurrent BIGINT;
    ALTER TABLE api_keys ADD COLUMN daily_tokens BIGINT;
    ALTER TABLE api_keys ADD COLUMN monthly_tokens BIGINT;
    ALTER TABLE api_keys ADD COLUMN models TEXT;
    CREATE TABLE key_counters (
        key_id BIGINT NOT NULL,
        span TEXT NOT NULL,
        starts DOUBLE PRECISION NOT NULL,
        ends DOUBLE PRECISION NOT NULL,
        used BIGINT NOT NULL,
        PRIMARY KEY (key_id, span)
    );
    CREATE TABLE key_leases (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        key_id BIGINT NOT NULL,
        expires DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX key_leases_key ON key_leases(key_id, expires);
    """ + _usage_tables("", "BIGINT") + """
    """,
    # Usage per key, per model, per node and in all (SQLite's version 10).
    _usage_by_tables("BIGINT"),
)

# Every table of the state, in an order that copies cleanly; those with an identity ``id``
# (whose sequence must continue after a copy).
TABLES = ("meta", "api_keys", "users", "registrations", "hf_stats", "login_failures", "nodes",
          "pulls", "requests", "responses", "aliases", "usage_hourly", "usage_daily",
          "usage_hourly_by", "usage_daily_by")
IDENTITY_TABLES = ("api_keys", "users", "nodes", "requests")


def statements(script: str) -> list[str]:
    """A migration's statements (none of them holds a ';' of its own)."""
    return [s.strip() for s in script.split(";") if s.strip()]
