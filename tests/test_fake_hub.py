"""The real ``huggingface_hub`` client works against ``tests.fake_hub.FakeHub``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import requests
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.fake_hub import FakeHub

REPO = "org/tiny"
SMALL = b'{"model_type": "llama"}'
ONNX = os.urandom(1_500_000)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as hub:
        hub.add_repo(
            REPO,
            {"config.json": SMALL, "onnx/model.onnx": ONNX, "slow.txt": b"s" * 200_000},
            downloads=42,
            likes=7,
        )
        hub.add_repo("org/secret", {"a.txt": b"secret"}, private=True, token="hf_good")
        yield hub


def _download(hub: FakeHub, tmp_path: Path, filename: str, repo: str = REPO, **kw: object) -> bytes:
    path = hf_hub_download(repo, filename, local_dir=tmp_path, endpoint=hub.endpoint, **kw)
    return Path(path).read_bytes()


def test_download_small_and_lfs_file(hub: FakeHub, tmp_path: Path) -> None:
    assert _download(hub, tmp_path, "config.json") == SMALL
    assert _download(hub, tmp_path, "onnx/model.onnx") == ONNX
    lfs_calls = [(r.method, r.status) for r in hub.requests if "model.onnx" in r.path]
    assert lfs_calls == [("HEAD", 302), ("HEAD", 200), ("GET", 200)]  # resolve -> CDN
    assert hub.downloads(REPO, "onnx/model.onnx") == 1
    assert hub.downloads(REPO, "config.json") == 1
    assert hub.bytes_served(REPO, "onnx/model.onnx") == len(ONNX)


def test_file_metadata(hub: FakeHub) -> None:
    sha = hub.add_repo(REPO, {"onnx/model.onnx": ONNX, "config.json": SMALL})
    url = hf_hub_url(REPO, "onnx/model.onnx", endpoint=hub.endpoint)
    meta = get_hf_file_metadata(url, endpoint=hub.endpoint)
    assert meta.size == len(ONNX)
    assert meta.etag == hashlib.sha256(ONNX).hexdigest()
    assert meta.commit_hash == sha
    assert meta.xet_file_data is None
    assert "/cdn/" in meta.location
    small = get_hf_file_metadata(hf_hub_url(REPO, "config.json", endpoint=hub.endpoint))
    assert small.size == len(SMALL) and small.commit_hash == sha
    assert small.etag == hashlib.sha1(b"blob %d\0" % len(SMALL) + SMALL).hexdigest()


def test_model_info_and_listing(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.endpoint)
    info = api.model_info(REPO, files_metadata=True)
    assert (info.id, info.downloads, info.likes) == (REPO, 42, 7)
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert siblings["onnx/model.onnx"].lfs is not None and siblings["config.json"].lfs is None
    assert sorted(api.list_repo_files(REPO)) == ["config.json", "onnx/model.onnx", "slow.txt"]
    top = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO)}
    assert top == {"onnx": "RepoFolder", "config.json": "RepoFile", "slow.txt": "RepoFile"}
    [onnx] = api.list_repo_tree(REPO, "onnx")
    assert onnx.lfs is not None and onnx.lfs.sha256 == hashlib.sha256(ONNX).hexdigest()
    hub.page_size = 1
    assert len(list(api.list_repo_tree(REPO, recursive=True))) == 4
    assert sum("cursor=" in r.path for r in hub.requests) == 3


def test_private_repo_needs_token(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, tmp_path, "a.txt", repo="org/secret", token=False)
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, tmp_path, "a.txt", repo="org/secret", token="hf_wrong")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info("org/secret")
    assert _download(hub, tmp_path, "a.txt", repo="org/secret", token="hf_good") == b"secret"
    assert HfApi(endpoint=hub.endpoint, token="hf_good").model_info("org/secret").private


def test_missing_repo_file_revision(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, tmp_path, "config.json", repo="org/nope")
    with pytest.raises(RemoteEntryNotFoundError):
        _download(hub, tmp_path, "nope.json")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, tmp_path, "config.json", revision="v9")


def test_range_requests(hub: FakeHub) -> None:
    url = hf_hub_url(REPO, "onnx/model.onnx", endpoint=hub.endpoint)
    r = requests.get(url, headers={"Range": "bytes=1000-"}, timeout=10)
    assert r.status_code == 206 and r.content == ONNX[1000:]
    assert r.headers["Content-Range"] == f"bytes 1000-{len(ONNX) - 1}/{len(ONNX)}"
    r = requests.get(url, headers={"Range": "bytes=10-19"}, timeout=10)
    assert r.status_code == 206 and r.content == ONNX[10:20]
    r = requests.get(url, headers={"Range": f"bytes={len(ONNX)}-"}, timeout=10)
    assert r.status_code == 416
    assert [r.range for r in hub.requests if r.method == "GET" and "/cdn/" in r.path][:2] == [
        "bytes=1000-",
        "bytes=10-19",
    ]


def test_injected_status(hub: FakeHub, tmp_path: Path) -> None:
    hub.inject("onnx/model.onnx", status=500, method="GET")
    with pytest.raises(HfHubHTTPError) as info:
        _download(hub, tmp_path, "onnx/model.onnx")
    assert info.value.response.status_code == 500
    assert _download(hub, tmp_path, "onnx/model.onnx") == ONNX  # the fault was used up
    assert hub.downloads(REPO, "onnx/model.onnx") == 1


def test_cut_connection(hub: FakeHub) -> None:
    url = hf_hub_url(REPO, "onnx/model.onnx", endpoint=hub.endpoint)
    for reset, error in ((False, httpx2.RemoteProtocolError), (True, httpx2.ReadError)):
        hub.inject("onnx/model.onnx", cut_after=100_000, reset=reset)
        received = bytearray()
        with (
            pytest.raises(error),
            httpx2.stream("GET", url, follow_redirects=True, timeout=10) as r,
        ):
            assert int(r.headers["Content-Length"]) == len(ONNX)
            for chunk in r.iter_raw():
                received += chunk
        assert 0 < len(received) <= 100_000 and ONNX.startswith(received)
    assert hub.downloads(REPO, "onnx/model.onnx") == 2


def test_resume_after_cut_uses_range(tmp_path: Path) -> None:
    data = os.urandom(12 << 20)
    with FakeHub() as hub:
        hub.add_repo(REPO, {"model.safetensors": data})
        hub.inject("model.safetensors", cut_after=11 << 20)
        assert _download(hub, tmp_path, "model.safetensors") == data
        gets = [r for r in hub.requests if r.method == "GET"]
    # huggingface_hub only counts whole 10 MiB chunks as received before resuming.
    assert [(g.range, g.status) for g in gets] == [(None, 200), ("bytes=10485760-", 206)]


def test_hang_does_not_block_server(hub: FakeHub, tmp_path: Path) -> None:
    url = hf_hub_url(REPO, "onnx/model.onnx", endpoint=hub.endpoint)
    hub.inject("onnx/model.onnx", hang_after=1000)
    result: list[bytes] = []
    reader = threading.Thread(
        target=lambda: result.append(requests.get(url, timeout=30).content), daemon=True
    )
    reader.start()
    deadline = time.monotonic() + 5
    while hub.hanging == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hub.hanging == 1
    assert _download(hub, tmp_path, "config.json") == SMALL
    hub.release()
    reader.join(timeout=10)
    assert result == [ONNX]

    hub.inject("onnx/model.onnx", hang_after=0)
    errors: list[Exception] = []

    def stalled_get() -> None:
        try:
            requests.get(url, timeout=30)
        except requests.RequestException as e:
            errors.append(e)

    stalled = threading.Thread(target=stalled_get, daemon=True)
    stalled.start()
    deadline = time.monotonic() + 5
    while hub.hanging == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    hub.close()  # also cuts the stalled response
    assert time.monotonic() - started < 2
    stalled.join(timeout=5)
    assert len(errors) == 1


def test_throttle(hub: FakeHub, tmp_path: Path) -> None:
    hub.throttle_bps = 400_000
    started = time.monotonic()
    assert _download(hub, tmp_path, "slow.txt") == b"s" * 200_000
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 5  # expected 0.5 s


def test_runs_as_a_script(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.gguf").write_bytes(b"GGUF" * 10)
    with subprocess.Popen(
        [sys.executable, "-m", "tests.fake_hub", "--repo", f"org/cli={tmp_path}"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ) as proc:
        try:
            assert proc.stdout is not None
            endpoint = proc.stdout.readline().strip()
            url = hf_hub_url("org/cli", "sub/w.gguf", endpoint=endpoint)
            assert requests.get(url, timeout=10).content == b"GGUF" * 10
        finally:
            proc.terminate()
        assert proc.wait(timeout=10) == 0
