# llmlb: `make run` sets up .venv and starts llmlb on port 8080; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# pip picks this exact CPU build from the machine's wheel cache; a looser range would pull a
# multi-GB CUDA build. On a GPU machine: make run TORCH_SPEC="torch>=2.4,<3".
TORCH_SPEC ?= torch==2.13.0
# llama-cpp-python builds from source: lean flags (no examples, tools, server or tests) and a
# portable AVX2 CPU build. pip caches the wheel, so only the first install pays for it.
# With CUDA: make run LLAMA_CMAKE_ARGS="-DGGML_CUDA=on" (and pip cache remove llama_cpp_python).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
export CMAKE_ARGS ?= $(LLAMA_CMAKE_ARGS)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

ARGS ?=
# Test files run in this many processes at once (pytest-xdist; 0: one process). Most tests
# wait on servers, nodes and timeouts rather than compute, so two share two cores well.
TEST_WORKERS ?= 2
# The coding agents tests/test_coding_agents.py drives, from npm into a project-local prefix.
NPM_TOOLS := .npm-tools
AGENT_CLIS := @anthropic-ai/claude-code@2.1 @openai/codex@0.171

.PHONY: run test install lint bench clean vendor-uplot

install: $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[engines]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[engines,test]"
	@# Playwright drives Debian's Chromium: its own browser download cannot work offline.
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq chromium; }
	@# The deployment tests run the shipped nginx site (deploy/nginx/) with Debian's nginx
	@# (and openssl for a throw-away certificate).
	{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null && command -v openssl >/dev/null \
		|| { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nginx openssl; }
	@# PostgreSQL for the shared-state tests (started by the tests themselves, as nobody).
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq postgresql; }
	@# Claude Code and Codex CLI (tests/test_coding_agents.py) run from $(NPM_TOOLS)/, never
	@# installed globally; without npm those tests skip and say why.
	command -v npm >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq npm; } || true
	command -v npm >/dev/null && npm install --prefix $(NPM_TOOLS) --no-audit --no-fund \
		--loglevel=error $(AGENT_CLIS) || echo "npm: the coding agent CLIs are not installed"
	touch $@

run: $(VENV)/.installed
	$(BIN)/llmlb serve $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check llmlb engines plugins tests bench
	@# the layering setup.cfg's [importlinter] contracts write down
	$(BIN)/lint-imports --no-cache

bench: $(VENV)/.installed-test
	@# bench/balancer.py drives the proxy with wrk, a C load generator (a Python client cannot
	@# saturate it), against nginx as the upstream (installed with the test dependencies).
	command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq wrk; }
	$(BIN)/python bench/api_latency.py
	$(BIN)/python bench/engine_overhead.py
	$(BIN)/python bench/batching.py
	$(BIN)/python bench/isolation.py --layout
	$(BIN)/python bench/download.py
	$(BIN)/python bench/hub.py
	$(BIN)/python bench/balancer.py
	$(BIN)/python bench/affinity.py
	$(BIN)/python bench/endpoints.py
	$(BIN)/python bench/state_lookup.py
	$(BIN)/python bench/ha.py
	$(BIN)/python bench/json_schema.py
	$(BIN)/python bench/dialects.py
	$(BIN)/python bench/soak.py

# The Usage page's charting library, vendored into the static files (committed; no CDN, nothing
# to install at test time). bench/charts.py compares it with Chart.js.
UPLOT_VERSION = 1.6.32
vendor-uplot:
	cd $$(mktemp -d) && npm pack uplot@$(UPLOT_VERSION) && tar xzf uplot-$(UPLOT_VERSION).tgz && \
		cp package/dist/uPlot.iife.min.js package/dist/uPlot.min.css $(CURDIR)/llmlb/dashboard/static/ && \
		cp package/LICENSE $(CURDIR)/llmlb/dashboard/static/uPlot.LICENSE

clean:
	rm -rf $(VENV) build *.egg-info test-artifacts bench/.work $(NPM_TOOLS)
