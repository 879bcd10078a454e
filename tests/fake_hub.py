"""A fake Hugging Face Hub: a real HTTP/1.1 server on loopback for tests and benchmarks.

It speaks the part of the Hub API that ``huggingface_hub`` uses to find and download model
files: ``/api/models/{repo}`` (model info), ``/api/models/{repo}/tree/{rev}[/{path}]`` (tree
listing with Link-header pagination) and ``/{repo}/resolve/{rev}/{file}`` (HEAD/GET, with Range).
Large ("LFS") files redirect, like on huggingface.co, to a "CDN" URL on the same server.
Xet is never advertised, so clients always use plain HTTP downloads.

Tests can throttle response bodies, inject faults per file (HTTP status, cut or stalled
connections), and inspect per-file download counters and a request log.

As a separate process (prints the endpoint on its first stdout line)::

    python -m tests.fake_hub --repo org/name=/path/to/dir [--repo ...] [--port N]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

LFS_THRESHOLD = 1_000_000
LFS_SUFFIXES = {".safetensors", ".gguf", ".onnx", ".onnx_data", ".bin", ".pt", ".pth", ".h5"}
FAKE_DATE = "2024-01-01T00:00:00.000Z"
CHUNK = 1 << 20  # write size when throttling or faulting
BLOCK = 64 << 20  # sendfile/sendall size otherwise: large, but counters still move during big files
HASH_BUF = 8 << 20

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_ROUTES = [
    ("info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("tree", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")),
    ("resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
    ("cdn", re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")),
]


@dataclass(frozen=True)
class HubFile:
    """One file of a repo; ``source`` is its content or a path to stream it from."""

    path: str
    source: bytes | Path
    size: int
    sha256: str
    git_oid: str  # git blob sha1 of the content, or of the LFS pointer for LFS files
    lfs: bool

    def lfs_info(self, sha_key: str) -> dict[str, Any]:
        pointer = _lfs_pointer(self.sha256, self.size)
        return {sha_key: self.sha256, "size": self.size, "pointerSize": len(pointer)}


@dataclass
class Repo:
    repo_id: str
    files: dict[str, HubFile]
    sha: str
    private: bool
    token: str | None
    downloads: int
    likes: int


@dataclass
class Fault:
    """A fault for requests of one file. ``times=None`` means forever.

    ``status`` answers HEAD/GET (``method`` to restrict) with that HTTP status instead;
    ``cut_after``/``hang_after`` apply to GETs that send the body: close the connection
    (TCP RST if ``reset``) or stall until ``FakeHub.release()`` after that many body bytes.
    """

    status: int | None = None
    cut_after: int | None = None
    hang_after: int | None = None
    reset: bool = False
    times: int | None = 1
    method: str | None = None
    repo_id: str | None = None


class LoggedRequest(NamedTuple):
    method: str
    path: str  # as sent, with the query string
    range: str | None
    status: int


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _make_file(path: str, source: bytes | Path) -> HubFile:
    sha = hashlib.sha256()
    if isinstance(source, bytes):
        size = len(source)
        sha.update(source)
    else:
        source = Path(source)
        size = source.stat().st_size
        with source.open("rb") as fh:
            while block := fh.read(HASH_BUF):
                sha.update(block)
    lfs = size > LFS_THRESHOLD or Path(path).suffix in LFS_SUFFIXES
    if lfs:
        oid = _git_oid(_lfs_pointer(sha.hexdigest(), size))
    else:
        oid = _git_oid(source if isinstance(source, bytes) else source.read_bytes())
    return HubFile(path, source, size, sha.hexdigest(), oid, lfs)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


class FakeHub:
    """Threaded fake Hub on ``127.0.0.1``; started on construction, stopped by ``close()``."""

    def __init__(self, port: int = 0) -> None:
        self.throttle_bps: int | None = None
        self.page_size = 1000
        self._lock = threading.Lock()
        self._repos: dict[str, Repo] = {}
        self._faults: list[tuple[str, Fault]] = []
        self._downloads: Counter[tuple[str, str]] = Counter()
        self._bytes: Counter[tuple[str, str]] = Counter()
        self._log: list[LoggedRequest] = []
        self._hangs: list[threading.Event] = []
        self._conns: set[socket.socket] = set()
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.hub = self
        self.port: int = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving: releases hung requests and drops every open connection."""
        if self._closing.is_set():
            return
        self._closing.set()
        self.release()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | Path] | Path,
        *,
        private: bool = False,
        token: str | None = None,
        downloads: int = 0,
        likes: int = 0,
    ) -> str:
        """Add (or replace) a model repo; a directory is added recursively. Returns its commit sha."""
        if isinstance(files, (str, os.PathLike)):
            root = Path(files)
            files = {
                p.relative_to(root).as_posix(): p
                for p in sorted(root.rglob("*"))
                if p.is_file() and ".git" not in p.relative_to(root).parts
            }
        entries = {path: _make_file(path, src) for path, src in files.items()}
        commit = hashlib.sha1(repo_id.encode())
        for path in sorted(entries):
            commit.update(f"\0{path}\0{entries[path].sha256}".encode())
        repo = Repo(repo_id, entries, commit.hexdigest(), private, token, downloads, likes)
        with self._lock:
            self._repos[repo_id] = repo
        return repo.sha

    def inject(self, filename: str, fault: Fault | None = None, **kwargs: Any) -> Fault:
        """Add a fault for ``filename`` (``Fault`` or its fields as kwargs); returns it."""
        fault = fault or Fault(**kwargs)
        with self._lock:
            self._faults.append((filename, fault))
        return fault

    def clear_faults(self, filename: str | None = None) -> None:
        with self._lock:
            self._faults = [(f, x) for f, x in self._faults if filename not in (None, f)]

    def release(self) -> None:
        """Let every currently hung response carry on sending."""
        with self._lock:
            hangs, self._hangs = self._hangs, []
        for event in hangs:
            event.set()

    @property
    def hanging(self) -> int:
        """Number of responses currently stalled by a ``hang_after`` fault."""
        with self._lock:
            return len(self._hangs)

    def downloads(self, repo_id: str, filename: str) -> int:
        """GET requests of this file that started sending a (full or ranged) body."""
        with self._lock:
            return self._downloads[repo_id, filename]

    def bytes_served(self, repo_id: str, filename: str) -> int:
        with self._lock:
            return self._bytes[repo_id, filename]

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def reset_counters(self) -> None:
        with self._lock:
            self._downloads.clear()
            self._bytes.clear()
            self._log.clear()

    def _repo(self, repo_id: str) -> Repo | None:
        with self._lock:
            return self._repos.get(repo_id)

    def _take_fault(self, repo_id: str, filename: str, method: str, body: bool) -> Fault | None:
        with self._lock:
            for name, fault in self._faults:
                if (
                    name == filename
                    and fault.repo_id in (None, repo_id)
                    and fault.method in (None, method)
                    and (fault.status is not None or body)
                    and fault.times != 0
                ):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def _hang(self) -> bool:
        """Block until released (True) or the hub closes (False)."""
        event = threading.Event()
        with self._lock:
            if self._closing.is_set():
                return False
            self._hangs.append(event)
        while not event.wait(0.1):
            if self._closing.is_set():
                return False
        return not self._closing.is_set()

    def _count(self, key: tuple[str, str], *, download: bool = False, sent: int = 0) -> None:
        with self._lock:
            self._downloads[key] += download
            self._bytes[key] += sent


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # idle keep-alive connections hold a thread; let them go eventually
    server: _Server
    hub: FakeHub
    send_body: bool  # False for HEAD
    query: dict[str, str]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._conns.add(self.connection)

    def finish(self) -> None:
        with self.server.hub._lock:
            self.server.hub._conns.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def _dispatch(self, body: bool) -> None:
        self.hub = self.server.hub
        self.send_body = body
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            for name, pattern in _ROUTES:
                if m := pattern.match(url.path):
                    getattr(self, f"_route_{name}")(**m.groupdict())
                    return
            self._error(404, None, "Not Found")
        except OSError:  # the client went away, or a fault cut the connection
            self.close_connection = True

    def _start(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        entry = LoggedRequest(self.command, self.path, self.headers.get("Range"), status)
        with self.hub._lock:
            self.hub._log.append(entry)

    def _json(self, data: Any, status: int = 200, **headers: str) -> None:
        raw = json.dumps(data).encode()
        headers |= {"Content-Type": "application/json", "Content-Length": str(len(raw))}
        self._start(status, headers)
        if self.send_body:
            self.wfile.write(raw)

    def _error(self, status: int, code: str | None, message: str, **headers: str) -> None:
        if code:
            headers["X-Error-Code"] = code
        self._json({"error": message}, status, **headers, **{"X-Error-Message": message})

    def _open_repo(self, repo_id: str, rev: str | None) -> Repo | None:
        """The repo if it exists, is readable with the sent token and has ``rev``; else answers an error."""
        repo = self.hub._repo(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        auth = self.headers.get("Authorization", "")
        if repo.private and not (auth.startswith("Bearer ") and repo.token in (None, auth[7:])):
            # The real Hub answers 401 + RepoNotFound so as not to reveal that private repos exist.
            self._error(401, "RepoNotFound", "Invalid username or password.")
            return None
        if rev is not None and unquote(rev) not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + unquote(rev))
            return None
        return repo

    def _route_info(self, repo: str, rev: str | None) -> None:
        if not (r := self._open_repo(repo, rev)):
            return
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for f in r.files.values():
            sibling: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                sibling |= {"size": f.size, "blobId": f.git_oid}
                if f.lfs:
                    sibling["lfs"] = f.lfs_info("sha256")
            siblings.append(sibling)
        author = r.repo_id.split("/")[0] if "/" in r.repo_id else None
        self._json(
            {
                "_id": r.sha[:24], "id": r.repo_id, "modelId": r.repo_id, "author": author,
                "sha": r.sha, "lastModified": FAKE_DATE, "createdAt": FAKE_DATE,
                "private": r.private, "gated": False, "disabled": False,
                "downloads": r.downloads, "likes": r.likes, "tags": [], "library_name": None,
                "siblings": siblings, "usedStorage": sum(f.size for f in r.files.values()),
            }
        )  # fmt: skip

    def _route_tree(self, repo: str, rev: str, path: str | None) -> None:
        if not (r := self._open_repo(repo, rev)):
            return
        prefix = unquote(path or "").strip("/")
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        dirs: set[str] = set()
        files: list[HubFile] = []
        for f in r.files.values():
            if prefix and not f.path.startswith(prefix + "/"):
                continue
            rest = f.path[len(prefix) + 1 :] if prefix else f.path
            parts = rest.split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):
                dirs.add("/".join(([prefix] if prefix else []) + parts[:i]))
            if recursive or len(parts) == 1:
                files.append(f)
        if prefix and not files and not dirs:
            self._error(404, "EntryNotFound", f"{prefix} does not exist on {rev}")
            return
        entries: list[dict[str, Any]] = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(dirs)
        ]
        for f in sorted(files, key=lambda f: f.path):
            entry: dict[str, Any] = dict(type="file", path=f.path, oid=f.git_oid, size=f.size)
            if f.lfs:
                entry["lfs"] = f.lfs_info("oid")
            entries.append(entry)
        start = int(self.query.get("cursor", "0"))
        end = start + self.hub.page_size
        headers: dict[str, str] = {}
        if end < len(entries):
            query = urlencode(self.query | {"cursor": str(end)})
            host = self.headers.get("Host", f"127.0.0.1:{self.hub.port}")
            headers["Link"] = f'<http://{host}{urlsplit(self.path).path}?{query}>; rel="next"'
        self._json(entries[start:end], **headers)

    def _route_resolve(self, repo: str, rev: str, path: str) -> None:
        if not (r := self._open_repo(repo, rev)):
            return
        f = r.files.get(unquote(path))
        commit = {"X-Repo-Commit": r.sha}
        if f is None:
            self._error(404, "EntryNotFound", "Entry not found", **commit)
        elif f.lfs:
            if fault := self.hub._take_fault(r.repo_id, f.path, self.command, body=False):
                self._error(fault.status or 500, None, "Injected fault", **commit)
                return
            host = self.headers.get("Host", f"127.0.0.1:{self.hub.port}")
            query = urlencode({"repo": r.repo_id, "path": f.path})
            location = f"http://{host}/cdn/{f.sha256}?{query}"
            headers = {"Location": location, "Content-Length": "0"}
            self._start(302, self._file_headers(r, f) | headers)
        else:
            self._serve(r, f)

    def _route_cdn(self, sha: str) -> None:
        r = self.hub._repo(self.query.get("repo", ""))
        f = r.files.get(self.query.get("path", "")) if r else None
        if r is None or f is None or f.sha256 != sha:
            self._error(404, None, "Not Found")
        else:
            self._serve(r, f)

    def _file_headers(self, r: Repo, f: HubFile) -> dict[str, str]:
        headers = {"X-Repo-Commit": r.sha, "ETag": f'"{f.git_oid}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
        return headers

    def _serve(self, r: Repo, f: HubFile) -> None:
        fault = self.hub._take_fault(r.repo_id, f.path, self.command, body=self.send_body)
        if fault and fault.status is not None:
            self._error(fault.status, None, "Injected fault", **{"X-Repo-Commit": r.sha})
            return
        headers = self._file_headers(r, f) | {"Content-Type": "application/octet-stream"}
        if f.lfs:  # on the CDN, as on the Hub's final response, the ETag is the content sha256
            headers["ETag"] = f'"{f.sha256}"'
            name = quote(f.path.rsplit("/", 1)[-1])
            headers["Content-Disposition"] = f"inline; filename*=UTF-8''{name}"
        start, end, status = 0, f.size, 200
        if m := re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", self.headers.get("Range", "")):
            first, last = m.groups()
            if first:
                start, end = int(first), min(int(last) + 1, f.size) if last else f.size
            elif last:
                start = max(f.size - int(last), 0)
            if (not first and not last) or start >= end:
                bad = {"Content-Range": f"bytes */{f.size}"}
                self._error(416, None, "Range Not Satisfiable", **bad)
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        self._start(status, headers | {"Content-Length": str(end - start)})
        if self.send_body:
            self.hub._count((r.repo_id, f.path), download=True)
            self._send_body(r, f, start, end, fault)

    def _send_body(self, r: Repo, f: HubFile, start: int, end: int, fault: Fault | None) -> None:
        key = (r.repo_id, f.path)
        fault = fault or Fault()
        stop = end if fault.cut_after is None else min(end, start + fault.cut_after)
        hang_at = None if fault.hang_after is None else start + fault.hang_after
        fh = f.source.open("rb") if isinstance(f.source, Path) else None
        pace_bps, pace_t0, pace_sent = None, 0.0, 0
        try:
            pos = start
            while pos < stop:
                if hang_at is not None and pos >= hang_at:
                    hang_at = None
                    if not self.hub._hang():
                        break
                    pace_bps = None
                limit = (stop if hang_at is None else min(stop, hang_at)) - pos
                bps = self.hub.throttle_bps
                if bps != pace_bps:  # (re)start pacing whenever the limit changes mid-response
                    pace_bps, pace_t0, pace_sent = bps, time.monotonic(), 0
                if bps:
                    n = min(limit, CHUNK, max(1, bps // 20))
                    self._write(fh, f, pos, n)
                elif fh is not None:
                    n = self.connection.sendfile(fh, pos, min(limit, BLOCK))
                else:
                    n = min(limit, BLOCK)
                    self._write(fh, f, pos, n)
                if n <= 0:
                    break
                pos += n
                self.hub._count(key, sent=n)
                if bps:
                    pace_sent += n
                    delay = pace_t0 + pace_sent / bps - time.monotonic()
                    if delay > 0 and self.hub._closing.wait(delay):
                        break
        finally:
            if fh is not None:
                fh.close()
        if pos < end:
            self._cut(fault.reset)

    def _write(self, fh: Any, f: HubFile, pos: int, n: int) -> None:
        if fh is not None:
            self.wfile.write(os.pread(fh.fileno(), n, pos))
        else:
            assert isinstance(f.source, bytes)
            self.wfile.write(memoryview(f.source)[pos : pos + n])

    def _cut(self, reset: bool) -> None:
        self.close_connection = True
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()  # the real close, and so the RST, happens once finish() drops rfile
        else:
            self.connection.shutdown(socket.SHUT_RDWR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a fake Hugging Face Hub on 127.0.0.1.")
    parser.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--throttle-bps", type=int, default=None)
    args = parser.parse_args(argv)
    hub = FakeHub(port=args.port)
    for spec in args.repo:
        repo_id, sep, directory = spec.partition("=")
        if not sep:
            parser.error(f"--repo wants ORG/NAME=DIR, got {spec!r}")
        hub.add_repo(repo_id, Path(directory))
    hub.throttle_bps = args.throttle_bps
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(hub.endpoint, flush=True)
    while not stop.wait(0.5):
        pass
    hub.close()


if __name__ == "__main__":
    main()
