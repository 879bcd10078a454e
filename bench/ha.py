"""Several balancers on one PostgreSQL (issue 21's figures).

Parts (``--parts``, all by default):

- ``proxy``: what the state engine costs a proxied request. ``wrk`` (core 0) against
  ``llmlb serve --role balancer`` (gevent, 1 worker, core 1) in front of the minimal
  upstream of ``bench/upstream.py`` (core 1), once on SQLite and once on PostgreSQL (Debian's,
  started in a temporary directory as tests/postgres.py does, core 1), in the same run:
  1 connection p50 (and what it adds to the upstream's own p50), 64 connections req/s.
  Goals: PostgreSQL adds <= 0.2 ms p50 over SQLite, and keeps >= 0.9x its req/s.
- ``revocation``: two balancers on one database; a key used on B (so B caches it) is revoked
  through A's admin API; B is asked every 5 ms until it refuses the key. Goal: <= 2 s.
- ``takeover``: two balancers; the one holding the leader lock of periodic work is killed
  (``kill -9`` of its process group); time until the other holds it. Goal: <= 30 s.
- ``scale``: req/s at 64 connections through nginx (the shipped site,
  ``deploy/nginx/llmlb.conf``, as tests/nginx.py runs it) to one balancer (1 gevent worker,
  pinned to core 0), then to two on one PostgreSQL (cores 0 and 1), the upstream registered
  as their node; wrk, nginx, the upstream and PostgreSQL on any core. The two runs alternate,
  ``--rounds`` times each, with the load average noted before each. Goal: two >= 1.7x one.

    .venv/bin/python bench/ha.py [--parts proxy,revocation,takeover,scale] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from balancer import pinned, start_upstream, wrk
from common import (
    REPO,
    VENV_BIN,
    WORK_ROOT,
    announce,
    clean_env,
    free_port,
    machine_info,
    run_facts,
    save_summary,
    start_server,
)
from cpuwatch import cpu_busy

sys.path.insert(0, str(REPO))

WORK = WORK_ROOT / "ha"
ENDPOINTS_KEY = "6SlU2IwtPSrNdv1h5DqTvlA1SQfjOw8AGdT0oqq6p8s="


def keys(target: str | Path) -> tuple[str, str, str]:
    from llmlb.auth import create_api_key
    from llmlb.state import open_database

    db = open_database(target)
    try:
        return tuple(create_api_key(db, name, scope)[0] for name, scope in
                     (("bench", "api"), ("bench-node", "node"), ("bench-admin", "admin")))
    finally:
        db.close()


def balancer(name: str, port: int, core: int | None, db_url: str | None, **env: str):  # noqa: ANN201
    home = WORK / name
    args = [str(VENV_BIN / "llmlb"), "serve", "--role", "balancer", "--port", str(port)]
    extra = {"LLMLB_DATABASE_URL": db_url, "LLMLB_ENDPOINTS_KEY": ENDPOINTS_KEY} if db_url \
        else {}
    return start_server(pinned(core, args) if core is not None else args, clean_env(
        LLMLB_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9", LLMLB_LOG_LEVEL="WARNING",
        LLMLB_NODE_TIMEOUT_SECONDS="86400", **extra, **env), WORK / f"{name}.log", port,
        name=name)


def register_upstream(port: int, node_key: str, upstream_port: int) -> None:
    import requests

    r = requests.post(f"http://127.0.0.1:{port}/v0/nodes", timeout=10,
                      headers={"Authorization": f"Bearer {node_key}"},
                      json={"name": "up", "url": f"http://127.0.0.1:{upstream_port}",
                            "secret": "bench-secret-0123456789",
                            "report": {"models": [{"id": "bench-model", "object": "model",
                                                   "created": 0, "owned_by": "local"}]}})
    r.raise_for_status()


def part_proxy(pg, seconds: float) -> dict:  # noqa: ANN001 - a tests.postgres.Postgres
    up_port = free_port()
    upstream = start_upstream(up_port, WORK / "upstream.log", core=1)
    path = "/v1/chat/completions"
    results: dict[str, dict] = {}
    try:
        wrk(f"http://127.0.0.1:{up_port}{path}", 8, 2, None)
        results["direct"] = {"c1": wrk(f"http://127.0.0.1:{up_port}{path}", 1, seconds, None)}
        for engine in ("sqlite", "postgresql"):
            db_url = pg.new_database() if engine == "postgresql" else None
            shutil.rmtree(WORK / f"lb-{engine}", ignore_errors=True)
            api, node, _ = keys(db_url or WORK / f"lb-{engine}" / "llmlb.db")
            port = free_port()
            lb = balancer(f"lb-{engine}", port, 1, db_url)
            try:
                register_upstream(port, node, up_port)
                base = f"http://127.0.0.1:{port}{path}"
                wrk(base, 8, 2, api)  # warm: connections, caches, the registry
                results[engine] = {"c1": wrk(base, 1, seconds, api),
                                   "c64": wrk(base, 64, seconds, api)}
            finally:
                lb.stop()
            c1, c64 = results[engine]["c1"], results[engine]["c64"]
            results[engine]["added_p50_us"] = c1["p50_us"] - results["direct"]["c1"]["p50_us"]
            print(f"  {engine:10s} 1 conn: p50 {c1['p50_us']} us (adds "
                  f"{results[engine]['added_p50_us']} us) | 64 conns: {c64['rps']} req/s, "
                  f"errors {c64['non2xx'] + c64['socket_errors']}", flush=True)
    finally:
        upstream.stop()
    results["postgresql_minus_sqlite_p50_us"] = (results["postgresql"]["c1"]["p50_us"]
                                                  - results["sqlite"]["c1"]["p50_us"])
    results["postgresql_over_sqlite_rps"] = round(results["postgresql"]["c64"]["rps"]
                                                  / results["sqlite"]["c64"]["rps"], 3)
    return results


def two_balancers(pg) -> tuple[str, list, tuple[str, str, str]]:  # noqa: ANN001
    """Two balancers on a fresh database: (its URL, [(proc, base URL)], keys)."""
    db_url = pg.new_database()
    made = keys(db_url)
    procs = []
    for name in ("a", "b"):
        shutil.rmtree(WORK / name, ignore_errors=True)
        port = free_port()
        procs.append((balancer(name, port, None, db_url), f"http://127.0.0.1:{port}"))
    return db_url, procs, made


def part_revocation(pg, rounds: int = 5) -> dict:  # noqa: ANN001
    import requests

    _, ((a, a_url), (b, b_url)), (_, _, admin) = two_balancers(pg)
    took = []
    try:
        for _ in range(rounds):
            made = requests.post(f"{a_url}/api/keys", json={"name": "r", "scopes": ["api"]},
                                 headers={"Authorization": f"Bearer {admin}"}, timeout=10).json()
            use = {"Authorization": f"Bearer {made['key']}"}
            assert requests.get(f"{b_url}/v1/models", headers=use, timeout=10).ok
            requests.delete(f"{a_url}/api/keys/{made['id']}", timeout=10,
                            headers={"Authorization": f"Bearer {admin}"}).raise_for_status()
            revoked = time.monotonic()
            while requests.get(f"{b_url}/v1/models", headers=use, timeout=10).ok:
                time.sleep(0.005)
            took.append(round((time.monotonic() - revoked) * 1000, 1))
    finally:
        a.stop()
        b.stop()
    print(f"  revocation seen by the other balancer after {took} ms", flush=True)
    return {"ms": took, "median_ms": statistics.median(took), "max_ms": max(took)}


def leader_pid(db_url: str) -> int | None:
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = "
            "l.pid WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE "
            "'llmlb leader %' AND a.datname = current_database()").fetchone()
    return int(row[0].split()[-1]) if row else None


def part_takeover(pg, rounds: int = 3) -> dict:  # noqa: ANN001
    took = []
    for _ in range(rounds):
        db_url, procs, _ = two_balancers(pg)
        try:
            while (pid := leader_pid(db_url)) is None:
                time.sleep(0.05)
            holder = next(p for p, _ in procs if pid in _tree(p.pid))
            os.killpg(holder.pid, signal.SIGKILL)
            killed = time.monotonic()
            while (now := leader_pid(db_url)) is None or now == pid:
                time.sleep(0.02)
            took.append(round(time.monotonic() - killed, 2))
        finally:
            for p, _ in procs:
                p.stop()
    print(f"  periodic work taken over after {took} s", flush=True)
    return {"seconds": took, "max_s": max(took)}


def part_scale(pg, seconds: float, rounds: int) -> dict:  # noqa: ANN001
    import requests

    from tests.nginx import Nginx

    up_port = free_port()
    upstream = start_upstream(up_port, WORK / "upstream-scale.log")
    db_url = pg.new_database()
    api, node, _ = keys(db_url)
    pg_pid = int((pg.data / "postmaster.pid").read_text().split()[0])
    ports = [free_port(), free_port()]
    lbs = [balancer(f"scale-{core}", ports[core], core, db_url, LLMLB_TRUSTED_PROXIES="1")
           for core in (0, 1)]
    path = "/v1/chat/completions"
    runs: dict[str, list[dict]] = {"one": [], "two": []}
    try:
        register_upstream(ports[0], node, up_port)
        for port in ports:  # both route to it (the other learns of it from the state)
            deadline = time.monotonic() + 30
            while requests.post(f"http://127.0.0.1:{port}{path}", json={"model": "bench-model",
                                "messages": [{"role": "user", "content": "hi"}]},
                                headers={"Authorization": f"Bearer {api}"}, timeout=10
                                ).status_code != 200:
                assert time.monotonic() < deadline, f"balancer on {port} never routed"
                time.sleep(0.1)
        for round_ in range(rounds):
            for name, used in (("one", ports[:1]), ("two", ports)):
                proxy = Nginx.start(WORK / f"nginx-{name}-{round_}",
                                    [f"127.0.0.1:{p}" for p in used])
                trees = {"balancers": [lb.pid for lb in lbs[:len(used)]],
                         "nginx": [proxy.process.pid], "upstream": [upstream.pid],
                         "postgresql": [pg_pid]}
                try:
                    wrk(proxy.url + path, 8, 2, api, core=None)  # warm: connections
                    load = os.getloadavg()[0]
                    before = {k: cpu_seconds(v) for k, v in trees.items()}
                    before["wrk"] = children_cpu()
                    result = wrk(proxy.url + path, 64, seconds, api, core=None)
                    after = {k: cpu_seconds(v) for k, v in trees.items()}
                    after["wrk"] = children_cpu()
                finally:
                    proxy.stop()
                # CPU per request: the balancers', and the rest's (nginx, the upstream,
                # PostgreSQL, wrk): what an idle machine would share out between them.
                per = {k: (after[k] - before[k]) * 1000 / result["requests"] for k in after}
                result["cpu_ms"] = {k: round(v, 3) for k, v in per.items()}
                result["balancer_cpu_ms"] = round(per["balancers"], 3)
                result["others_cpu_ms"] = round(sum(per.values()) - per["balancers"], 3)
                result["load_before"] = round(load, 2)
                runs[name].append(result)
                print(f"  {name} balancer{'s' if name == 'two' else ''}: {result['rps']} "
                      f"req/s, p99 {result['p99_us'] / 1000:.1f} ms, errors "
                      f"{result['non2xx'] + result['socket_errors']}, CPU per request "
                      f"{result['balancer_cpu_ms']} ms in balancers, "
                      f"{result['others_cpu_ms']} ms elsewhere {result['cpu_ms']} "
                      f"(load {load:.1f})", flush=True)
    finally:
        for lb in lbs:
            lb.stop()
        upstream.stop()
    ratios = [round(two["rps"] / one["rps"], 2) for one, two in zip(runs["one"], runs["two"],
                                                                    strict=True)]
    # On an idle 2-core machine one balancer is bound by its core (1/b1 req/s, the rest on
    # the other core), two by both cores (2/(b2+h2), the CPU per request of each run):
    # two over one = 2 b1 / (b2 + h2).
    b1, b2, h2 = (statistics.median(r[key] for r in runs[side]) for side, key in (
        ("one", "balancer_cpu_ms"), ("two", "balancer_cpu_ms"), ("two", "others_cpu_ms")))
    bound = round(2 * b1 / (b2 + h2), 2)
    # Deployed, the clients (wrk) and the node (the upstream) run on other machines: only
    # nginx and PostgreSQL share the balancers' cores.
    h2_here = statistics.median(r["cpu_ms"]["nginx"] + r["cpu_ms"]["postgresql"]
                                for r in runs["two"])
    deployed = round(2 * b1 / (b2 + h2_here), 2)
    print(f"  two over one, per round: {ratios}; on an idle machine, from the CPU per "
          f"request (2 b1 / (b2 + h2)): {bound}, {deployed} with wrk and the upstream on "
          "other machines", flush=True)
    return {**runs, "two_over_one": ratios, "two_over_one_median": statistics.median(ratios),
            "idle_machine_two_over_one": bound,
            "idle_machine_two_over_one_clients_and_node_elsewhere": deployed}


def cpu_seconds(roots: list[int]) -> float:
    """CPU time (user and system) of the processes ``roots`` and all their descendants."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
            times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf(
                "SC_CLK_TCK")
    total, todo = 0.0, list(roots)
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += times.get(pid, 0.0)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return total


def children_cpu() -> float:
    """CPU time of this process's finished children (wrk)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree(pid: int) -> set[int]:
    """``pid`` and its children (gunicorn's master and workers)."""
    found = {pid}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="proxy,revocation,takeover,scale")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="scale: runs of each side")
    args = parser.parse_args()
    parts = args.parts.split(",")
    started, load_before = announce("ha")
    busy_before = cpu_busy(0.5)
    from tests.postgres import Postgres

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    (WORK_ROOT / "balancer").mkdir(parents=True, exist_ok=True)  # balancer.wrk's script
    pg = Postgres.start()
    summary: dict = {"machine": machine_info(), "preliminary": "a shared, busy machine"}
    try:
        if "proxy" in parts:
            print("proxy on each engine (wrk on core 0; upstream, balancer and PostgreSQL on "
                  "core 1):", flush=True)
            summary["proxy"] = part_proxy(pg, args.seconds)
        if "revocation" in parts:
            summary["revocation"] = part_revocation(pg)
        if "takeover" in parts:
            summary["takeover"] = part_takeover(pg)
        if "scale" in parts:
            print("req/s through nginx to one balancer (core 0), then two (cores 0, 1):",
                  flush=True)
            summary["scale"] = part_scale(pg, args.seconds, args.rounds)
    finally:
        pg.destroy()
    summary["run"] = run_facts("ha", started, load_before, busy_before)
    save_summary("ha", summary, indent=2)


if __name__ == "__main__":
    main()
