"""Where model files come from when they are not on disk: Hugging Face (through
``huggingface_hub``, against ``HF_ENDPOINT``) or the balancer's blob route.

A source turns a model into a list of ``RemoteFile`` (name, size, checksum, URL, headers);
``download.py`` fetches them the same way whatever the source. A source also says where its
downloads may lead (``allows``): a redirect is followed only there, so whoever answers at a
source's address cannot make a node fetch from a host the allowlist does not name (an internal
service, say) and keep the answer as a model.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
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
MAX_REDIRECTS = 10


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


def host_allowed(host: str | None, allowlist: Iterable[str]) -> bool:
    """The host is on the allowlist, itself or as a subdomain of a host there."""
    host = (host or "").lower().rstrip(".")
    return bool(host) and any(
        host == entry or host.endswith("." + entry)
        for entry in (e.lower().rstrip(".") for e in allowlist) if entry)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class HuggingFaceSource:
    name = "HuggingFace"

    def __init__(self, endpoint: str, token: str | None, allowlist: Iterable[str] = ()) -> None:
        self.endpoint, self.token = endpoint, token
        self.host = urlsplit(endpoint).hostname or ""
        self.allowlist = tuple(allowlist)

    @property
    def allowed(self) -> bool:
        """Downloads from the hub are allowed at all."""
        return host_allowed(self.host, self.allowlist)

    def allows(self, url: str) -> bool:
        """A download (or a redirect of one) may go to ``url``."""
        return urlsplit(url).scheme in ("http", "https") and \
            host_allowed(urlsplit(url).hostname, self.allowlist)

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
    """Files a balancer serves from ``/v1/models/blob/{model}/{filename}`` (node scope). A
    node given several balancers (behind nginx, one state) asks each in turn: each serves
    the copies on its own host."""

    name = "the balancer"

    def __init__(self, balancer_urls: Sequence[str], api_key: str | None,
                 allowlist: Iterable[str] = ()) -> None:
        self.bases = tuple(url.rstrip("/") for url in balancer_urls)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.allowlist = tuple(allowlist)

    def allows(self, url: str) -> bool:
        """A balancer itself (scheme, host and port: another port of its host is another
        service), or a host of the allowlist."""
        return any(_origin(url) == _origin(base) for base in self.bases) or (
            urlsplit(url).scheme in ("http", "https")
            and host_allowed(urlsplit(url).hostname, self.allowlist))

    def plan(self, model_id: str) -> list[RemoteFile] | None:
        """The first balancer's files for the model, or None when none has a local copy."""
        for base in self.bases:
            files = self._plan_at(base, model_id)
            if files:
                return files
        return None

    def _plan_at(self, base: str, model_id: str) -> list[RemoteFile] | None:
        url = f"{base}/v0/models/registry/{quote(model_id)}/manifest.json"
        try:
            # Not followed elsewhere: whoever answers here is the balancer or nobody.
            response = get_session().get(url, headers=self.headers, timeout=METADATA_TIMEOUT,
                                         follow_redirects=False)
        except httpx2.HTTPError as exc:
            log.warning("Balancer %s unreachable for %s: %s", base, model_id, exc)
            return None
        if response.status_code != 200:
            return None
        try:
            files = response.json().get("files", [])
        except (ValueError, AttributeError):
            log.warning("Balancer %s sent an unreadable manifest for %s", base, model_id)
            return None
        blob = f"{base}/v1/models/blob/{quote(model_id)}/"
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


@contextlib.contextmanager
def open_stream(client: httpx2.Client, remote: RemoteFile, start: int, read_timeout: float,
                allows: Callable[[str], bool], source: str) -> Iterator[httpx2.Response]:
    """A streaming GET of the file from byte ``start`` (HTTP Range when resuming), following
    redirects only to URLs ``allows`` accepts (httpx drops the credentials when a redirect
    leaves the origin). ``source`` names where the file comes from, for the error."""
    headers = {**remote.headers, "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    timeout = httpx2.Timeout(connect=METADATA_TIMEOUT, read=read_timeout, write=read_timeout,
                             pool=read_timeout)
    request: httpx2.Request | None = client.build_request("GET", remote.url, headers=headers,
                                                          timeout=timeout)
    for hop in range(MAX_REDIRECTS + 1):
        assert request is not None
        url = str(request.url)
        if not allows(url):
            where = "sent" if hop == 0 else "redirected"
            parts = urlsplit(url)
            raise DownloadError(
                f"{source} {where} {remote.filename} to {parts.scheme}://{parts.netloc}, "
                "which is not in LLMLB_DOWNLOAD_ALLOWLIST: refused")
        response = client.send(request, stream=True, follow_redirects=False)
        if response.next_request is None:
            try:
                yield response
            finally:
                response.close()
            return
        request = response.next_request
        response.close()
    raise DownloadError(f"{source} redirected {remote.filename} more than {MAX_REDIRECTS} "
                        "times")


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
