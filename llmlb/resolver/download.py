"""Fetching files atomically (RS-6): bytes go to ``<name>.partial``, a crash leaves it for the
next attempt to continue with HTTP Range, and only a file whose size and checksum (sha256, or
the git blob id of small hub files) are right is renamed to its real name.

A file is never longer than its declared size: a server that sends more (or announces more in
``Content-Length``) fails the download, and what it sent is deleted, so a source cannot fill a
node's disk with one small manifest entry.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx2

from ..storage import InvalidFileName, path_inside
from .sources import DownloadError, RemoteFile, open_stream, raise_for_status

CHUNK = 1 << 20
MAX_STALLED_ATTEMPTS = 3  # reconnects in a row that brought no new byte


def _hasher(remote: RemoteFile):  # noqa: ANN202 - a hashlib object or None
    if remote.sha256:
        return hashlib.sha256()
    if remote.git_sha1:
        h = hashlib.sha1(usedforsecurity=False)
        h.update(f"blob {remote.size}\0".encode())
        return h
    return None


def _hash_existing(path: Path, hasher) -> None:  # noqa: ANN001
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            hasher.update(block)


@dataclass(frozen=True)
class Fetch:
    """How files are fetched: the client, the read timeout, where redirects may lead
    (``allows``) and the source's name for errors."""

    client: httpx2.Client
    read_timeout: float
    allows: Callable[[str], bool]
    source: str


def _too_long(remote: RemoteFile, source: str, partial: Path) -> DownloadError:
    partial.unlink(missing_ok=True)  # never keep, nor resume from, what overran
    return DownloadError(f"{source} sent more than the {remote.size} bytes declared for "
                         f"{remote.filename}: refused")


def _announced(response: httpx2.Response) -> int | None:
    with suppress(KeyError, ValueError):
        return int(response.headers["Content-Length"])
    return None


def fetch_file(fetch: Fetch, remote: RemoteFile, final: Path,
               report: Callable[[int], None]) -> None:
    """Download one file to ``final`` (resuming a partial one); report(n) per n new bytes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    have = partial.stat().st_size if partial.exists() else 0
    if have > remote.size:
        partial.unlink()
        have = 0
    hasher = _hasher(remote)
    if have and hasher is not None:
        _hash_existing(partial, hasher)
    report(have)
    stalled = 0
    while have < remote.size or (remote.size == 0 and not partial.exists()):
        before = have
        try:
            with open_stream(fetch.client, remote, have, fetch.read_timeout, fetch.allows,
                             fetch.source) as response:
                raise_for_status(response)
                if have and response.status_code == 200:  # the server ignored our Range
                    report(-have)
                    have = 0
                    partial.unlink(missing_ok=True)
                    hasher = _hasher(remote)
                announced = _announced(response)
                if announced is not None and announced > remote.size - have:
                    raise _too_long(remote, fetch.source, partial)
                with partial.open("ab") as out:
                    # As the bytes arrive (not in fixed blocks), so progress moves smoothly
                    # and a slow link still shows it.
                    for chunk in response.iter_bytes():
                        if have + len(chunk) > remote.size:
                            out.close()
                            raise _too_long(remote, fetch.source, partial)
                        out.write(chunk)
                        if hasher is not None:
                            hasher.update(chunk)
                        have += len(chunk)
                        report(len(chunk))
                if have < remote.size:
                    raise httpx2.RemoteProtocolError("the server closed the connection early")
        except (httpx2.RemoteProtocolError, httpx2.ReadError):
            # A dropped connection: continue from where it stopped, unless it keeps
            # dropping without bringing anything.
            stalled = 0 if have > before else stalled + 1
            if stalled >= MAX_STALLED_ATTEMPTS:
                raise
            continue
    if have != remote.size:
        raise DownloadError(f"{remote.filename} is {have} bytes, expected {remote.size}")
    if hasher is not None:
        expected = remote.sha256 or remote.git_sha1
        actual = hasher.hexdigest()
        if actual != expected:
            partial.unlink(missing_ok=True)  # never resume from bytes known to be wrong
            kind = "sha256" if remote.sha256 else "git sha1"
            raise DownloadError(f"Checksum mismatch for {remote.filename}: expected {kind} "
                                f"{expected}, got {actual}")
    os.replace(partial, final)


def fetch_all(fetch: Fetch, files: list[RemoteFile], staging: Path,
              report: Callable[[int], None]) -> None:
    """Fetch every file into ``staging``; files already complete there are kept."""
    for remote in files:
        try:
            final = path_inside(staging, remote.filename)
        except InvalidFileName as exc:
            raise DownloadError(f"refusing to write {remote.filename!r}: {exc}") from None
        if final.is_file() and final.stat().st_size == remote.size:
            report(remote.size)  # verified and renamed by an earlier attempt
            continue
        fetch_file(fetch, remote, final, report)
