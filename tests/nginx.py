"""Debian's real nginx in front of llmlb, serving the shipped site ``deploy/nginx/llmlb.conf``.

``site_for_tests`` turns the deploy file into one the tests can run: the upstream addresses
(the site's ``server`` lines, one per balancer, become the tests' own, their parameters
kept), the listen address (a free port of 127.0.0.1), the access log's path, and no TLS; every other
line as shipped, so the tests check the file operators install. ``Nginx.start`` runs it in
its own directory (config, pid, logs, temp dirs), in the foreground, as a child process. The
``nginx`` and ``behind_nginx`` fixtures in ``conftest.py`` wrap these for tests.
``check_shipped_site`` runs ``nginx -t`` on the file as shipped, TLS included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "deploy" / "nginx" / "llmlb.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

MAIN_CONFIG = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
{user}
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/default-access.log;
    client_body_temp_path {dir}/tmp/client_body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    include {dir}/site.conf;
}}
"""


def site_for_tests(text: str, upstream: str | list[str], listen: str,
                   access_log: Path) -> str:
    """The deploy site with the test's addresses (one balancer or several) and log, served
    over plain HTTP."""
    addresses = [upstream] if isinstance(upstream, str) else list(upstream)
    out: list[str] = []
    counts = {"upstream": 0, "listen": 0, "access_log": 0}
    in_upstream = False
    parameters = ""
    for line in text.splitlines():
        words = line.split()
        first = words[0] if words else ""
        if first == "upstream" and words[1:2] == ["llmlb"]:
            in_upstream = True
        elif in_upstream and first == "server":
            counts["upstream"] += 1
            if counts["upstream"] > 1:
                continue  # every address comes from the first server line's shape
            parameters = " ".join(w for w in line.split("#")[0].split()[2:]).rstrip(";")
            line = "\n".join(f"    server {a} {parameters};".replace(" ;", ";")
                             for a in addresses)
        elif in_upstream and first == "}":
            in_upstream = False
        elif first == "listen":
            counts["listen"] += 1
            if counts["listen"] > 1:
                continue  # one address is enough here (the site listens on IPv4 and IPv6)
            line = f"    listen {listen};"
        elif first.startswith("ssl_"):
            continue
        elif first == "access_log":
            counts["access_log"] += 1
            line = f"    access_log {access_log} {' '.join(words[2:])}"
        out.append(line)
    if not counts["upstream"] or not counts["listen"] or counts["access_log"] != 1:
        raise ValueError(f"{SITE} no longer has the shape the tests rewrite: {counts}")
    return "\n".join(out) + "\n"


def check_shipped_site(directory: Path) -> subprocess.CompletedProcess:
    """``nginx -t`` of the site with only its certificate and log paths pointed at files
    made here (a throw-away self-signed certificate)."""
    directory.mkdir(parents=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=llm.example.com", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    text = SITE.read_text()
    for shipped, here in (("/etc/ssl/certs/llm.example.com.pem", cert),
                          ("/etc/ssl/private/llm.example.com.key", key),
                          ("/var/log/nginx/llmlb.access.log", directory / "access.log")):
        if shipped not in text:
            raise ValueError(f"{SITE} no longer names {shipped}")
        text = text.replace(shipped, str(here))
    (directory / "site.conf").write_text(text)
    (directory / "tmp").mkdir()
    (directory / "nginx.conf").write_text(MAIN_CONFIG.format(dir=directory, user=""))
    return subprocess.run([NGINX, "-t", "-p", str(directory), "-c",
                           str(directory / "nginx.conf"), "-e", str(directory / "error.log")],
                          capture_output=True, text=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Nginx:
    url: str
    port: int
    directory: Path
    process: subprocess.Popen

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.access_log, self.error_log)
                       if p.exists())

    @classmethod
    def start(cls, directory: Path, upstream: str | list[str], timeout: float = 20) -> Nginx:
        if not Path(NGINX).exists():
            raise FileNotFoundError("nginx is missing: `make test` installs Debian's nginx")
        (directory / "tmp").mkdir(parents=True)
        port = _free_port()
        (directory / "site.conf").write_text(site_for_tests(
            SITE.read_text(), upstream, f"127.0.0.1:{port}", directory / "access.log"))
        # As root, nginx's workers would switch to 'nobody', who cannot enter these dirs.
        user = "user root;" if os.geteuid() == 0 else ""
        (directory / "nginx.conf").write_text(MAIN_CONFIG.format(dir=directory, user=user))
        process = subprocess.Popen(
            [NGINX, "-p", str(directory), "-c", str(directory / "nginx.conf"),
             "-e", str(directory / "error.log")],
            stdout=subprocess.DEVNULL, stderr=(directory / "stderr.log").open("wb"),
            start_new_session=True)
        nginx = cls(f"http://127.0.0.1:{port}", port, directory, process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited with {process.returncode}:\n"
                                   f"{(directory / 'stderr.log').read_text()}{nginx.logs()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return nginx
            except OSError:
                time.sleep(0.05)
        nginx.stop()
        raise RuntimeError(f"nginx did not listen on {port}:\n{nginx.logs()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
