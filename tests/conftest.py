"""Shared fixtures: an isolated LLMLB_HOME, real llmlb servers on loopback (in-process with
werkzeug, or as subprocesses: `llmlb serve`, gunicorn), and the official openai client."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import requests
from werkzeug.serving import make_server as make_wsgi_server

from llmlb import create_app
from llmlb import server as llmlb_server
from llmlb.config import OPTIONS
from llmlb.roles import prepare

from .fake_balancer import FakeBalancer
from .fake_hub import FakeHub
from .fake_openai import FakeOpenAI
from .nginx import Nginx
from .postgres import Postgres

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# Nothing in the tests may reach the real hub: point it at a closed local port by default.
CLOSED_ENDPOINT = "http://127.0.0.1:9"
ARTIFACTS = REPO / "test-artifacts"
HELLO = [{"role": "user", "content": "Hello! How are you?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def llmlb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh LLMLB_HOME, with every llmlb setting removed from the environment."""
    for option in OPTIONS:
        for name in option.env:
            monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LLMLB_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_ENDPOINT)
    return home


@dataclass
class LiveServer:
    url: str
    app: object
    _server: object
    _thread: threading.Thread

    @property
    def runtime(self):  # noqa: ANN201
        return self.app.extensions["llmlb"]

    @property
    def models_dir(self) -> Path:
        return self.runtime.settings.models_dir

    def client(self, api_key: str = "sk_debug", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0,
                             timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)
        self.runtime.close()


@pytest.fixture
def make_server(llmlb_home: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start a real llmlb HTTP server in this process; overrides are settings."""
    servers: list[LiveServer] = []

    def start(**overrides) -> LiveServer:
        config = {"home": llmlb_home, "dev": True, "hf_endpoint": CLOSED_ENDPOINT,
                  "plugins_dir": [str(llmlb_home / "plugins")], **overrides}
        app = create_app(config)
        prepare(app.extensions["llmlb"].settings)  # what gunicorn's master does once
        llmlb_server.start(app)  # and what each worker does
        server = make_wsgi_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        live = LiveServer(f"http://127.0.0.1:{server.server_port}", app, server, thread)
        servers.append(live)
        return live

    yield start
    for live in servers:
        live.stop()


@pytest.fixture
def server(make_server: Callable[..., LiveServer]) -> LiveServer:
    return make_server()


# --- tiny real models ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight models (the same Llama as safetensors, GGUF and ONNX; a BERT)."""
    from .tinymodels import build_all

    return build_all(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def long_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama with a 16k context, keyed by format. Greedy, it never stops before
    LLMLB_CONTEXT_LENGTH (4096 tokens): a stream that runs for seconds and writes more than
    a socket buffers, so that tests can hold a model busy or time a whole generation."""
    from .tinymodels import make_llama_gguf, make_llama_onnx, make_llama_safetensors

    root = tmp_path_factory.mktemp("long-context")
    st = make_llama_safetensors(root / "st", max_position_embeddings=16384)
    return {"safetensors": st, "gguf": make_llama_gguf(st, root / "gguf" / "model.gguf"),
            "onnx": make_llama_onnx(st, root / "onnx")}


@pytest.fixture(scope="session")
def brief_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with a 16k context that ends its answers after a few dozen tokens, keyed
    by format: for agents (Codex, the Agents SDK) that send no output limit and wait for
    the model to finish."""
    from .tinymodels import make_llama_gguf, make_llama_safetensors

    root = tmp_path_factory.mktemp("brief")
    st = make_llama_safetensors(root / "st", max_position_embeddings=16384, brief=True)
    return {"safetensors": st, "gguf": make_llama_gguf(st, root / "gguf" / "model.gguf")}


def install(server: LiveServer, tiny: dict[str, Path], key: str, model_id: str) -> str:
    """Copy one of the tiny models into the server's models directory, as a user would."""
    src = tiny[key]
    dst = server.models_dir / model_id
    if src.is_file():
        dst.mkdir(parents=True)
        shutil.copy(src, dst / src.name)
    else:
        shutil.copytree(src, dst)
    return model_id


# --- a Hugging Face stand-in --------------------------------------------------------------

@pytest.fixture
def hub() -> Iterator[FakeHub]:
    """A server on loopback speaking the Hugging Face endpoints huggingface_hub uses."""
    with FakeHub() as h:
        yield h


def artifact(path: Path, filename: str) -> dict:
    return {"filename": filename, "size_bytes": path.stat().st_size}


def write_catalog(path: Path, models: list[dict]) -> Path:
    full = [{"name": m["id"], "required_vram_mb": 64, "tags": ["test"], **m} for m in models]
    path.write_text(json.dumps({"models": full}))
    return path


@pytest.fixture
def published(hub: FakeHub, tiny: dict[str, Path], tmp_path: Path) -> Path:
    """Tiny models published on the fake hub, and a catalog naming them."""
    gguf = tiny["llama-gguf"]
    hub.add_repo("llmlb-test/tiny-gguf", {"model.gguf": gguf, "README.md": b"# tiny\n",
                                          "model-f16.gguf": b"other quantisation" * 1000},
                 downloads=1234, likes=56)
    hub.add_repo("llmlb-test/tiny-st", tiny["llama-st"])
    hub.add_repo("llmlb-test/private", {"model.gguf": gguf}, private=True, token="hf_secret")
    st_files = sorted(p.name for p in tiny["llama-st"].iterdir())
    return write_catalog(tmp_path / "catalog.json", [
        {"id": "tiny-gguf", "source": "hf_gguf", "repo_id": "llmlb-test/tiny-gguf",
         "artifacts": [artifact(gguf, "model.gguf")]},
        {"id": "tiny-st", "source": "hf_safetensors", "repo_id": "llmlb-test/tiny-st",
         "artifacts": [artifact(tiny["llama-st"] / f, f) for f in st_files]},
        {"id": "private-gguf", "source": "hf_gguf", "repo_id": "llmlb-test/private",
         "artifacts": [artifact(gguf, "model.gguf")]},
        {"id": "bad-sha", "source": "hf_gguf", "repo_id": "llmlb-test/tiny-gguf",
         "artifacts": [{**artifact(gguf, "model.gguf"), "sha256": "0" * 64}]},
    ])


@pytest.fixture
def fake_balancer() -> Iterator[FakeBalancer]:
    """A hostile balancer on loopback (tests/fake_balancer.py)."""
    balancer = FakeBalancer()
    yield balancer
    balancer.close()


@pytest.fixture
def hub_server(make_server, hub: FakeHub, published: Path) -> Callable[..., LiveServer]:
    """Start servers whose catalog is ``published`` and whose Hugging Face is ``hub``."""
    def start(**overrides) -> LiveServer:
        return make_server(**{"supported_models": published, "hf_endpoint": hub.endpoint,
                              "download_timeout_seconds": 3, **overrides})
    return start


# --- subprocess servers ---------------------------------------------------------------------

@dataclass
class Proc:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 60,
                 ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n"
                               f"{log_path.read_text(errors='replace')}")
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server did not become healthy:\n{log_path.read_text(errors='replace')}")


@pytest.fixture
def start_process(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Run a server command (in its own process group) and wait for /health."""
    procs: list[Proc] = []

    def start(args: list[str], env: dict[str, str], port: int, wait: bool = True) -> Proc:
        log_path = tmp_path / f"server-{len(procs)}.log"
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=log_path.open("wb"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(f"http://127.0.0.1:{port}", process, log_path)
        procs.append(proc)
        if wait:
            wait_healthy(proc.url, process, log_path)
        return proc

    yield start
    for proc in procs:
        proc.stop(signal.SIGKILL)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """Start Debian's nginx with the shipped site (deploy/nginx/llmlb.conf) in front of an
    llmlb listening on the given port of 127.0.0.1 (or of several, given a list)."""
    started: list[Nginx] = []

    def start(upstream_port: int | list[int]) -> Nginx:
        ports = upstream_port if isinstance(upstream_port, list) else [upstream_port]
        proxy = Nginx.start(tmp_path / f"nginx-{len(started)}",
                            [f"127.0.0.1:{port}" for port in ports])
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One real PostgreSQL for the session (Debian's, as an unprivileged user; see postgres.py)."""
    pg = Postgres.start()
    yield pg
    pg.destroy()


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """The URL of a fresh, empty PostgreSQL database for this test."""
    return postgres.new_database()


ENGINES = ("sqlite", "postgresql")
ENDPOINTS_KEY = "6SlU2IwtPSrNdv1h5DqTvlA1SQfjOw8AGdT0oqq6p8s="  # a Fernet key, for the tests


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, llmlb_home: Path,
           monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per state engine: "sqlite" (the default file under LLMLB_HOME) and
    "postgresql" (a fresh database, given to everything the test starts — servers in this
    process, the CLI, subprocesses — through LLMLB_DATABASE_URL, with the key every balancer
    on a shared database needs)."""
    if request.param == "postgresql":
        monkeypatch.setenv("LLMLB_DATABASE_URL", request.getfixturevalue("pg_url"))
        monkeypatch.setenv("LLMLB_ENDPOINTS_KEY", ENDPOINTS_KEY)
    return request.param


def open_test_state(home: Path):  # noqa: ANN201 - a State
    """The state a server with this home uses (SQLite file or LLMLB_DATABASE_URL)."""
    from llmlb.config import load_settings
    from llmlb.state import open_state

    return open_state(load_settings({"home": home}).files)


@dataclass
class Deployment:
    """gunicorn serving llmlb, behind nginx: ``url`` is nginx's, ``app.url`` gunicorn's."""

    url: str
    app: Proc
    proxy: Nginx


@pytest.fixture
def behind_nginx(start_process, nginx, llmlb_home: Path) -> Callable[..., Deployment]:
    """Deploy as the README says: gunicorn (gunicorn.conf.py, LLMLB_TRUSTED_PROXIES=1) behind
    the nginx site; extra keyword arguments are environment variables for llmlb."""
    def start(**env: str) -> Deployment:
        port = free_port()
        app = start_process([*gunicorn_command(), "-c", "gunicorn.conf.py", "wsgi:app"],
                            {"LLMLB_PORT": str(port), "LLMLB_TRUSTED_PROXIES": "1", **env}, port)
        proxy = nginx(port)
        return Deployment(proxy.url, app, proxy)
    return start


def llmlb_command() -> list[str]:
    return [str(VENV_BIN / "llmlb")] if (VENV_BIN / "llmlb").exists() else \
        [sys.executable, "-m", "llmlb"]


def gunicorn_command() -> list[str]:
    exe = VENV_BIN / "gunicorn"
    return [str(exe)] if exe.exists() else [shutil.which("gunicorn") or "gunicorn"]


def save_artifact(name: str, data: bytes) -> Path:
    """Keep something a test produced (screenshots) under test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(data)
    return path


def dashboard_login(base_url: str, password: str, username: str = "admin",
                    browser: requests.Session | None = None) -> requests.Response:
    """Log in through the dashboard's form as a browser does (CSRF token from the page);
    the session cookie stays in ``browser``."""
    import re

    browser = browser if browser is not None else requests.Session()
    page = browser.get(f"{base_url}/login", timeout=10).text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    response = browser.post(f"{base_url}/login", allow_redirects=False, timeout=30, data={
        "csrf_token": token, "username": username, "password": password})
    response.browser = browser  # type: ignore[attr-defined]
    return response


def page_csrf(browser: requests.Session, url: str) -> str:
    """The CSRF token a dashboard page gives its scripts."""
    import re

    page = browser.get(url, timeout=10).text
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', page).group(1)


def raw_get(server: LiveServer, path: str) -> tuple[int, dict]:
    """GET a path exactly as written (no client-side normalisation of '..')."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path, headers={"Authorization": "Bearer sk_debug"})
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeOpenAI]]:
    """Start OpenAI-compatible stand-ins (``fake_openai.FakeOpenAI``) on loopback."""
    started: list[FakeOpenAI] = []

    def start(name: str = "gpu", *models: str, **kwargs) -> FakeOpenAI:
        fake = FakeOpenAI(name, models or ("fake-model",), **kwargs).__enter__()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.__exit__()
