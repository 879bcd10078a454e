"""Where model files come from when they are not on disk: Hugging Face (through
``huggingface_hub``, against ``HF_ENDPOINT``) or the balancer's blob route.

A source turns a model into a list of ``RemoteFile`` (name, size, checksum, URL, headers);
``download.py`` fetches them the same way whatever the source.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import httpx2
from huggingface_hub import errors as hf_errors
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from ..catalog import CatalogModel
from ..storage import InvalidFileName, safe_file_name

log = logging.getLogger(__name__)

METADATA_TIMEOUT = 10.0


class DownloadError(Exception):
    """A download failed; the message is the cause shown to the user."""


@dataclass(frozen=True)
class RemoteFile:
    filename: str
    size: int
    url: str
    sha256: str | None = None
    git_sha1: str | None = None  # small files on the hub are checked by their git blob id
    headers: dict[str, str] = field(default_factory=dict)


class HuggingFaceSource:
    name = "HuggingFace"

    def __init__(self, endpoint: str, token: str | None) -> None:
        self.endpoint, self.token = endpoint, token
        self.host = urlsplit(endpoint).hostname or ""

    def plan(self, entry: CatalogModel) -> list[RemoteFile]:
        headers = build_hf_headers(token=self.token or False)
        files = []
        for art in entry.artifacts:
            url = hf_hub_url(entry.repo_id, art.filename, revision=entry.revision,
                             endpoint=self.endpoint)
            try:
                meta = get_hf_file_metadata(url, token=self.token or False,
                                            timeout=METADATA_TIMEOUT, endpoint=self.endpoint)
            except Exception as exc:
                raise DownloadError(describe_failure(exc, entry.repo_id, art.filename)) from exc
            size = meta.size if meta.size is not None else art.size_bytes
            if meta.size is not None and art.size_bytes and meta.size != art.size_bytes:
                log.warning("%s/%s is %d bytes on the hub, %d in the catalog; using the hub's",
                            entry.repo_id, art.filename, meta.size, art.size_bytes)
            etag = (meta.etag or "").lower()
            hub_sha256 = etag if len(etag) == 64 else None
            if art.sha256 and hub_sha256 and art.sha256 != hub_sha256:
                log.warning("%s/%s: the catalog's sha256 differs from the hub's; the catalog's "
                            "is checked", entry.repo_id, art.filename)
            files.append(RemoteFile(
                art.filename, size, meta.location or url, sha256=art.sha256 or hub_sha256,
                git_sha1=etag if len(etag) == 40 and not art.sha256 else None,
                headers=headers))
        return files


class BalancerSource:
    """Files a balancer serves from ``/v1/models/blob/{model}/{filename}`` (node scope)."""

    name = "the balancer"

    def __init__(self, balancer_url: str, api_key: str | None) -> None:
        self.base = balancer_url.rstrip("/")
        self.host = urlsplit(self.base).hostname or ""
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def plan(self, model_id: str) -> list[RemoteFile] | None:
        """The balancer's files for the model, or None when it has no local copy."""
        url = f"{self.base}/v0/models/registry/{quote(model_id)}/manifest.json"
        try:
            response = get_session().get(url, headers=self.headers, timeout=METADATA_TIMEOUT)
        except httpx2.HTTPError as exc:
            log.warning("Balancer %s unreachable for %s: %s", self.base, model_id, exc)
            return None
        if response.status_code != 200:
            return None
        try:
            files = response.json().get("files", [])
        except (ValueError, AttributeError):
            log.warning("Balancer %s sent an unreadable manifest for %s", self.base, model_id)
            return None
        blob = f"{self.base}/v1/models/blob/{quote(model_id)}/"
        if not isinstance(files, list) or not files or not all(
                isinstance(f, dict) and str(f.get("url", "")).startswith(blob) for f in files):
            return None  # the balancer only knows the catalog entry, not the bytes
        return [manifest_file(f, self.headers) for f in files]


def manifest_file(item: dict, headers: dict[str, str]) -> RemoteFile:
    """One file of a balancer's manifest, its name checked before it can become a path: a
    balancer (or whoever answers at its address) must not make a node write elsewhere."""
    name = item.get("filename")
    try:
        safe_file_name(name)
    except InvalidFileName as exc:
        raise DownloadError(f"the balancer's manifest names an unsafe file {name!r}: "
                            f"{exc}") from None
    size, sha256 = item.get("size_bytes"), item.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise DownloadError(f"the balancer's manifest gives {name!r} no valid size_bytes")
    if sha256 is not None and not (isinstance(sha256, str) and len(sha256) == 64):
        raise DownloadError(f"the balancer's manifest gives {name!r} an invalid sha256")
    return RemoteFile(name, size, item["url"], sha256=sha256, headers=headers)


def open_stream(client: httpx2.Client, remote: RemoteFile, start: int, read_timeout: float):
    """A streaming GET of the file from byte ``start`` (HTTP Range when resuming)."""
    headers = {**remote.headers, "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    timeout = httpx2.Timeout(connect=METADATA_TIMEOUT, read=read_timeout, write=read_timeout,
                             pool=read_timeout)
    return client.stream("GET", remote.url, headers=headers, timeout=timeout,
                         follow_redirects=True)


def raise_for_status(response: httpx2.Response) -> None:
    hf_raise_for_status(response)


def describe_failure(exc: BaseException, repo: str = "", filename: str = "") -> str:
    """The cause of a failed download in words a user can act on."""
    where = f"{repo}/{filename}" if repo else filename
    if isinstance(exc, DownloadError):
        return str(exc)
    if isinstance(exc, hf_errors.GatedRepoError):
        return (f"Repository {repo} is gated: accept its terms on Hugging Face and set "
                "HF_TOKEN")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return (f"Repository {repo} not found or private (set HF_TOKEN for private "
                "repositories)")
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return f"File {where} not found"
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "error"
        return f"HTTP {status} while fetching {where}"
    if isinstance(exc, httpx2.TimeoutException):
        return "Network timeout"
    if isinstance(exc, httpx2.ConnectError):
        return f"Cannot connect: {exc}"
    if isinstance(exc, httpx2.HTTPError):
        return f"Connection lost while fetching {where}: {exc}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "No space left on device"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({where})"
    return f"{type(exc).__name__}: {exc}"
