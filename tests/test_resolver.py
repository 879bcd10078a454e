"""Automatic model resolution (RS): local → shared (in place) → download → error, against a
local server that speaks the Hugging Face endpoints, with the real huggingface_hub client."""

from __future__ import annotations

import errno
import shutil
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from .conftest import CLOSED_ENDPOINT, HELLO, LiveServer, raw_get
from .fake_balancer import FakeBalancer
from .fake_hub import FakeHub
from .tinymodels import make_llama_gguf, make_llama_safetensors

DEV = {"Authorization": "Bearer sk_debug"}


def status(server: LiveServer, model_id: str) -> dict:
    return requests.get(f"{server.url}/v0/models/{model_id}/status", headers=DEV,
                        timeout=10).json()


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("llmlb")]


def test_seed_001_flow(hub_server, hub: FakeHub, tiny, caplog: pytest.LogCaptureFixture
                       ) -> None:
    server = hub_server()
    hub.throttle_bps = 400_000  # ~1.5 s for the 570 KB model: progress in steps
    assert status(server, "tiny-gguf")["status"] == "not_downloaded"
    reply = server.client().chat.completions.create(model="tiny-gguf", messages=HELLO,
                                                    max_tokens=5)
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 5
    log = messages(caplog)
    assert "Model resolution started: tiny-gguf" in log
    assert "Model not found locally, downloading from HuggingFace..." in log
    steps = [m for m in log if m.startswith("Download progress: ")]
    assert [s.split("%")[0] for s in steps] == [f"Download progress: {p}" for p in
                                                range(10, 101, 10)]
    assert steps[0].endswith("MB / 0.6 MB)")
    assert "Download completed: tiny-gguf" in log
    assert any(m.startswith("Model loaded successfully") for m in log)
    assert log.index("Download completed: tiny-gguf") < next(
        i for i, m in enumerate(log) if m.startswith("Model loaded successfully"))

    # Only the catalog's artifact was fetched; the files sit in a plain directory.
    assert hub.downloads("llmlb-test/tiny-gguf", "model.gguf") == 1
    assert hub.downloads("llmlb-test/tiny-gguf", "model-f16.gguf") == 0
    assert hub.downloads("llmlb-test/tiny-gguf", "README.md") == 0
    model_dir = server.models_dir / "tiny-gguf"
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.gguf"]
    assert (model_dir / "model.gguf").read_bytes() == tiny["llama-gguf"].read_bytes()
    assert not list(server.models_dir.rglob("*.partial"))
    assert status(server, "tiny-gguf") == {
        "model_id": "tiny-gguf", "status": "local", "progress": 1.0,
        "downloaded_bytes": model_dir.joinpath("model.gguf").stat().st_size,
        "total_bytes": model_dir.joinpath("model.gguf").stat().st_size,
        "local_path": str(model_dir)}
    server.client().chat.completions.create(model="tiny-gguf", messages=HELLO, max_tokens=2)
    assert hub.downloads("llmlb-test/tiny-gguf", "model.gguf") == 1
    assert "tiny-gguf" in [m.id for m in server.client().models.list().data]


def test_status_shows_rising_progress(hub_server, hub: FakeHub) -> None:
    server = hub_server()
    hub.throttle_bps = 250_000  # the safetensors model is ~590 KB over 5 files
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(reply=server.client()
                              .chat.completions.create(model="tiny-st", messages=HELLO,
                                                       max_tokens=3)))
    thread.start()
    seen = []
    while thread.is_alive():
        s = status(server, "tiny-st")
        if s["status"] != "not_downloaded" or seen:  # (the request may not have begun yet)
            seen.append(s)
            assert s["status"] in ("downloading", "local")
        time.sleep(0.1)
    thread.join()
    downloading = [s["progress"] for s in seen if s["status"] == "downloading"]
    assert len(set(downloading)) >= 3 and downloading == sorted(downloading)
    assert all(s["total_bytes"] > 500_000 for s in seen)
    assert seen[-1]["status"] == "local" or status(server, "tiny-st")["status"] == "local"
    assert result["reply"].usage.completion_tokens == 3


def test_unknown_model(hub_server, hub: FakeHub) -> None:
    server = hub_server()
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="unknown-model", messages=HELLO)
    assert info.value.body["message"] == ("Model 'unknown-model' is not supported. "
                                          "Check supported_models.json.")
    assert hub.requests == []  # decided without asking anyone
    r = requests.get(f"{server.url}/v0/models/unknown-model/status", headers=DEV, timeout=10)
    assert r.status_code == 404


def test_wrong_sha256_is_never_ready(hub_server, hub: FakeHub) -> None:
    server = hub_server()
    with pytest.raises(openai.APIStatusError) as info:
        server.client().chat.completions.create(model="bad-sha", messages=HELLO)
    assert info.value.status_code == 502
    body = info.value.body
    assert body["code"] == "download_failed" and body["type"] == "upstream_error"
    assert body["message"].startswith("Failed to download model: Checksum mismatch")
    assert not (server.models_dir / "bad-sha").exists()
    assert not list(server.models_dir.rglob("*.partial"))
    assert "bad-sha" not in [m.id for m in server.client().models.list().data]
    s = status(server, "bad-sha")
    assert s["status"] == "error" and "Checksum mismatch" in s["error_message"]


@pytest.mark.parametrize("fault,cause", [
    ({"status": 500, "method": "GET", "times": None}, "HTTP 500"),
    ({"hang_after": 100_000, "times": None}, "Network timeout"),
])
def test_upstream_failures_are_502_and_retryable(hub_server, hub: FakeHub, fault: dict,
                                                 cause: str) -> None:
    server = hub_server(download_timeout_seconds=1.5)
    hub.inject("model.gguf", **fault)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        server.client().chat.completions.create(model="tiny-gguf", messages=HELLO)
    assert time.monotonic() - started < 30
    assert info.value.status_code == 502
    assert info.value.body["code"] == "download_failed"
    assert cause in info.value.body["message"]
    s = status(server, "tiny-gguf")
    assert s["status"] == "error" and cause in s["error_message"]
    # The lock was released: once the hub behaves, the next request succeeds.
    hub.clear_faults()
    hub.release()
    reply = server.client().chat.completions.create(model="tiny-gguf", messages=HELLO,
                                                    max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_cut_connections_resume_with_range(hub_server, hub: FakeHub, tiny) -> None:
    server = hub_server()
    hub.inject("model.gguf", cut_after=200_000, times=2)
    reply = server.client().chat.completions.create(model="tiny-gguf", messages=HELLO,
                                                    max_tokens=2)
    assert reply.usage.completion_tokens == 2
    ranges = [r.range for r in hub.requests if r.method == "GET" and "/cdn/" in r.path]
    assert ranges[0] is None and ranges[1] == "bytes=200000-" and ranges[2] == "bytes=400000-"
    size = tiny["llama-gguf"].stat().st_size
    assert hub.bytes_served("llmlb-test/tiny-gguf", "model.gguf") == size


def test_private_repo_needs_hf_token(hub_server, hub: FakeHub) -> None:
    server = hub_server()
    with pytest.raises(openai.APIStatusError) as info:
        server.client().chat.completions.create(model="private-gguf", messages=HELLO)
    assert info.value.status_code == 502
    assert "set HF_TOKEN" in info.value.body["message"]
    with_token = hub_server(hf_token="hf_secret", models_dir=server.models_dir.parent / "m2")
    reply = with_token.client().chat.completions.create(model="private-gguf", messages=HELLO,
                                                        max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_hf_token_from_dotenv(llmlb_home: Path, hub_server, hub: FakeHub) -> None:
    (llmlb_home / ".env").write_text("HF_TOKEN=hf_secret\n")
    server = hub_server()
    assert server.client().chat.completions.create(
        model="private-gguf", messages=HELLO, max_tokens=1).usage.completion_tokens == 1


def test_shared_path_is_used_in_place(hub_server, hub: FakeHub, tiny, tmp_path: Path) -> None:
    shared = tmp_path / "nfs"
    shutil.copytree(tiny["llama-gguf"].parent, shared / "tiny-gguf")
    server = hub_server(shared_models_dir=shared)
    client = server.client()
    before = client.chat.completions.create(model="tiny-gguf", messages=HELLO, max_tokens=8,
                                            temperature=0).choices[0].message.content
    assert hub.requests == []
    assert [p.name for p in server.models_dir.iterdir() if not p.name.startswith(".")] == []
    assert status(server, "tiny-gguf")["local_path"] == str(shared / "tiny-gguf")

    # An updated file on the shared path is used by the next load, still in place.
    other = make_llama_safetensors(tmp_path / "other", seed=11)
    make_llama_gguf(other, shared / "tiny-gguf" / "model.gguf")
    after = client.chat.completions.create(model="tiny-gguf", messages=HELLO, max_tokens=8,
                                           temperature=0).choices[0].message.content
    assert after != before
    assert [p.name for p in server.models_dir.iterdir() if not p.name.startswith(".")] == []


def test_missing_shared_path_falls_back_to_download(hub_server, hub: FakeHub,
                                                    tmp_path: Path) -> None:
    server = hub_server(shared_models_dir=tmp_path / "unmounted-nfs")
    reply = server.client().chat.completions.create(model="tiny-gguf", messages=HELLO,
                                                    max_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert (server.models_dir / "tiny-gguf" / "model.gguf").is_file()


def test_allowlist_blocks_other_hosts(hub_server, hub: FakeHub) -> None:
    server = hub_server(download_allowlist=["huggingface.co"])
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="tiny-gguf", messages=HELLO)
    assert "LLMLB_DOWNLOAD_ALLOWLIST" in info.value.body["message"]
    assert hub.requests == []


def test_wait_limit_gives_503_with_progress(hub_server, hub: FakeHub) -> None:
    server = hub_server(resolve_wait_seconds=1)
    hub.throttle_bps = 150_000  # ~4 s
    with pytest.raises(openai.InternalServerError) as info:
        server.client().chat.completions.create(model="tiny-gguf", messages=HELLO)
    assert info.value.status_code == 503
    body = info.value.body
    assert body["code"] == "model_downloading" and body["type"] == "service_unavailable"
    assert body["message"].startswith("Model 'tiny-gguf' is still downloading (")
    assert body["message"].endswith("% complete)")
    assert int(info.value.response.headers["Retry-After"]) > 0
    # The download carries on without the request that started it.
    deadline = time.monotonic() + 30
    while status(server, "tiny-gguf")["status"] != "local" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status(server, "tiny-gguf")["status"] == "local"
    assert hub.downloads("llmlb-test/tiny-gguf", "model.gguf") == 1


def test_too_many_waiters_get_503_at_once(hub_server, hub: FakeHub) -> None:
    server = hub_server(max_resolve_waiters=1)
    hub.throttle_bps = 300_000
    first = threading.Thread(target=lambda: server.client().chat.completions.create(
        model="tiny-gguf", messages=HELLO, max_tokens=1))
    first.start()
    while status(server, "tiny-gguf")["status"] != "downloading":
        time.sleep(0.05)
    with pytest.raises(openai.InternalServerError) as info:
        server.client().chat.completions.create(model="tiny-gguf", messages=HELLO)
    assert info.value.body["code"] == "model_downloading"
    first.join()


def test_blob_route_serves_ranges_to_nodes(hub_server, tiny) -> None:
    server = hub_server()
    shutil.copytree(tiny["llama-st"], server.models_dir / "org" / "tiny")
    url = f"{server.url}/v1/models/blob/org/tiny/model.safetensors"
    data = (tiny["llama-st"] / "model.safetensors").read_bytes()
    assert requests.get(url, headers=DEV, timeout=10).content == data
    part = requests.get(url, headers={**DEV, "Range": "bytes=100-199"}, timeout=10)
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    from llmlb import auth

    api_key, _ = auth.create_api_key(server.runtime.db, "inference only", "api")
    assert requests.get(url, headers={"X-API-Key": api_key}, timeout=10).status_code == 403
    for bad in ("org/tiny/../../secret", "org/tiny/.hidden", "org/tiny/nope.bin",
                "nothere/model.safetensors", "org/tiny/%2e%2e/%2e%2e/x"):
        status_code, body = raw_get(server, f"/v1/models/blob/{bad}")
        assert status_code in (400, 404) and "error" in body, bad


@pytest.mark.parametrize("others", [[], [CLOSED_ENDPOINT]], ids=["one", "after-a-dead-one"])
def test_node_fetches_through_the_balancer(make_server, hub_server, tiny, hub: FakeHub,
                                           tmp_path: Path, others: list[str]) -> None:
    """From its balancer, or from the first of several that has the model."""
    balancer = make_server()
    shutil.copytree(tiny["llama-st"], balancer.models_dir / "tiny-st")
    node = hub_server(balancer_url=",".join([*others, balancer.url]), node_api_key="sk_debug",
                     download_allowlist=["none"], models_dir=tmp_path / "node-models")
    reply = node.client().chat.completions.create(model="tiny-st", messages=HELLO,
                                                  max_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert hub.requests == []  # the node never went to the internet
    for f in (tiny["llama-st"]).iterdir():
        assert (tmp_path / "node-models" / "tiny-st" / f.name).read_bytes() == f.read_bytes()


@pytest.mark.parametrize("endpoint,cause", [
    ("http://127.0.0.1:9", "Cannot connect"),            # connection refused
    ("http://hub.nonexistent.invalid", "Cannot connect"),  # DNS failure
])
def test_unreachable_source_is_502(hub_server, endpoint: str, cause: str) -> None:
    server = hub_server(hf_endpoint=endpoint)
    with pytest.raises(openai.APIStatusError) as info:
        server.client().chat.completions.create(model="tiny-gguf", messages=HELLO)
    assert info.value.status_code == 502
    assert info.value.body["message"].startswith(f"Failed to download model: {cause}")
    assert status(server, "tiny-gguf")["status"] == "error"


@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201 - Iterator[Path]
    """A 2 MB tmpfs: a models directory on a disk that fills up for real."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): "
                    f"{done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write a file that leaves about ``leave`` bytes free on ``disk``."""
    filler = disk / "filler.bin"
    with filler.open("ab", buffering=0) as f:
        try:
            f.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
        except OSError as exc:  # the download wrote meanwhile: full is what was asked for
            if exc.errno != errno.ENOSPC or leave:
                raise
    return filler


def test_a_full_disk_fails_the_download_cleanly(hub_server, hub: FakeHub, small_disk: Path,
                                                ) -> None:
    server = hub_server(models_dir=small_disk)
    client = server.client(timeout=60)

    # Too little room from the start: refused before a byte is fetched.
    filler = fill(small_disk, 200_000)  # the model is 570 KB
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="tiny-gguf", messages=HELLO, max_tokens=2)
    assert info.value.status_code == 502
    error = info.value.body
    assert error["code"] == "download_failed" and "Not enough disk space" in error["message"]
    assert hub.downloads("llmlb-test/tiny-gguf", "model.gguf") == 0
    filler.unlink()

    # Room at the start, the disk fills during the download: ENOSPC for real.
    hub.inject("model.gguf", hang_after=100_000)
    r = requests.post(f"{server.url}/api/models/register", json={"model_id": "tiny-gguf"},
                      headers=DEV, timeout=10)
    assert r.status_code == 202
    deadline = time.monotonic() + 30
    while hub.hanging == 0:
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.05)
    filler = fill(small_disk, 0)
    hub.release()
    while (body := status(server, "tiny-gguf"))["status"] != "error":
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    assert "No space left on device" in body["error_message"]
    # Nothing partial stays to keep the disk full, and nothing looks like a model.
    leftovers = [p.relative_to(small_disk) for p in small_disk.rglob("*")
                 if p.is_file() and p != filler and ".locks" not in p.parts]
    assert leftovers == []
    assert not (small_disk / "tiny-gguf").exists()
    listed = requests.get(f"{server.url}/v1/models/tiny-gguf", headers=DEV, timeout=10).json()
    assert listed.get("status") != "local"

    # The lock was released: with room again, the next request downloads and answers.
    filler.unlink()
    reply = client.chat.completions.create(model="tiny-gguf", messages=HELLO, max_tokens=2)
    assert reply.usage.completion_tokens == 2


# --- a hostile balancer (or whoever answers at its address) steers no download -------------

SECRET = b"internal-secret: db password hunter2\n"


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts]


@pytest.mark.parametrize("target", ["other-port", "other-host"])
def test_a_blob_redirect_leaves_neither_the_balancer_nor_the_allowlist(
        make_server, fake_balancer: FakeBalancer, target: str) -> None:
    """The finding: a blob route that redirects to an internal service on loopback. The node
    refuses to follow it, never asks the service, and keeps nothing."""
    from .fake_balancer import LoopbackServer, send

    internal = LoopbackServer(lambda h: send(h, SECRET, length=len(SECRET)),
                              host="127.0.0.1" if target == "other-port" else "127.0.0.2")
    try:
        fake_balancer.blob = lambda h: send(h, b"", 302, length=0, headers={
            "Location": f"{internal.url}/internal-secret"})
        fake_balancer.manifest("model.gguf", size=len(SECRET))
        node = make_server(balancer_url=fake_balancer.url, node_api_key="sk_debug",
                           download_allowlist=["none"])
        with pytest.raises(openai.APIStatusError) as info:
            node.client().chat.completions.create(model="evil", messages=HELLO)
        assert info.value.status_code == 502
        error = info.value.body
        assert error["code"] == "download_failed"
        assert "redirected model.gguf" in error["message"]
        assert "LLMLB_DOWNLOAD_ALLOWLIST" in error["message"]
        assert fake_balancer.blob_requests  # the node did ask its balancer
        assert internal.requests == []      # and never the host it was sent to
        assert files_under(node.models_dir) == []
        assert status(node, "evil")["status"] == "error"
        models = [m.id for m in node.client().models.list()]
        assert "evil" not in models
    finally:
        internal.close()


def test_a_redirect_within_the_balancer_is_followed(make_server,
                                                    fake_balancer: FakeBalancer) -> None:
    """Its own blob route on its own origin stays usable, with a redirect in between."""
    from .fake_balancer import PAYLOAD, send

    def blob(handler) -> None:  # noqa: ANN001
        if handler.path.endswith("/moved"):
            send(handler, PAYLOAD, length=len(PAYLOAD))
        else:
            send(handler, b"", 307, length=0,
                 headers={"Location": "/v1/models/blob/evil/moved"})

    fake_balancer.blob = blob
    fake_balancer.manifest("model.gguf")
    node = make_server(balancer_url=fake_balancer.url, node_api_key="sk_debug",
                       download_allowlist=["none"])
    with pytest.raises(openai.APIStatusError):  # the payload is no GGUF: loading fails
        node.client().chat.completions.create(model="evil", messages=HELLO)
    assert (node.models_dir / "evil" / "model.gguf").read_bytes() == PAYLOAD


@pytest.mark.parametrize("announced", [True, False])
def test_a_blob_longer_than_declared_is_refused_and_removed(
        make_server, fake_balancer: FakeBalancer, announced: bool) -> None:
    """The finding: a 100-byte manifest entry, 30 MB sent. The node stops at the declared
    size (whether Content-Length says more or the body just goes on) and keeps nothing."""
    flood = 30 * 1024 * 1024

    def blob(handler) -> None:  # noqa: ANN001
        handler.send_response(200)
        if announced:
            handler.send_header("Content-Length", str(flood))
        handler.send_header("Connection", "close")
        handler.end_headers()
        try:
            for _ in range(flood // 65536):
                handler.wfile.write(b"A" * 65536)
        except OSError:  # the node hung up: what it should do
            pass

    fake_balancer.blob = blob
    fake_balancer.manifest("model.gguf", size=100)
    node = make_server(balancer_url=fake_balancer.url, node_api_key="sk_debug",
                       download_allowlist=["none"])
    with pytest.raises(openai.APIStatusError) as info:
        node.client().chat.completions.create(model="evil", messages=HELLO)
    assert info.value.status_code == 502
    error = info.value.body
    assert error["code"] == "download_failed"
    assert "more than the 100 bytes declared for model.gguf" in error["message"]
    assert files_under(node.models_dir) == []  # no .partial kept
