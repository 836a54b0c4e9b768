# One entry point per habit. Each target creates the virtualenv (.venv) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test test-fast test-random test-busy test-py test-pythons lock-check check fmt migrate down clean bench soak doctor lock scale-out cluster-test images image-test prometheusrule

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

## run: find or start PostgreSQL and Redis, migrate, serve the API (Hypercorn) and the worker
run: $(VENV)/.installed
	$(PY) -m tools run

# The servers the tests run besides PostgreSQL and Redis (PgBouncer, Sentinel, Prometheus
# with promtool), and the browser that opens /docs (Debian's chromium, driven by Playwright:
# tests/e2e/test_docs_browser.py).
SERVER_PACKAGES := pgbouncer:pgbouncer redis-sentinel:redis-sentinel prometheus:prometheus \
	chromium:chromium

.PHONY: servers
servers:
	sh tools/debian_packages.sh $(SERVER_PACKAGES)

## test: the whole test suite against real PostgreSQL and Redis (started if need be)
test: $(VENV)/.installed servers
	$(PY) -m pytest $(PYTEST_ARGS)

## test-fast: tests/app without the tests marked slow (no processes started, no big tables);
## under a minute. tests/conftest.py marks every other folder slow and fails an unmarked test
## that starts a process.
test-fast: $(VENV)/.installed
	$(PY) -m pytest tests/app -m 'not slow' $(PYTEST_ARGS)

## test-random: the whole suite in a random order (pytest-randomly, which the usual runs leave
## off); the seed is printed, and RANDOM_SEED=<seed> repeats an order
test-random: $(VENV)/.installed servers
	$(PY) -m pytest -p randomly $(if $(RANDOM_SEED),--randomly-seed=$(RANDOM_SEED)) $(PYTEST_ARGS)

## test-busy: the whole suite BUSY_RUNS times in a row (default 3) while a plain CPU loop keeps
## one core busy; each run's counts, time and failing tests are printed (tools/busy.py)
BUSY_RUNS ?= 3
test-busy: $(VENV)/.installed servers
	$(PY) -m tools test-busy --runs $(BUSY_RUNS) -- $(PYTEST_ARGS)

# The other Pythons requires-python admits (>=3.11) that CI tests: the whole suite runs on the
# default python3 (3.11, `make test`), and on each of these what differs between Pythons.
PY_VERSIONS ?= 3.12 3.13
PY_VERSION ?= 3.13
# The app in-process and over HTTP under Hypercorn, the drain, shutdown and start-failure paths
# (Hypercorn's shutdown waits differently from Python 3.12 on: pgjones/hypercorn#308), and the
# worker's SIGTERM and Redis-restart paths over arq's internals.
PY_TESTS ?= tests/app tests/e2e tests/deploy/test_shutdown.py tests/deploy/test_drain_readiness.py \
	tests/deploy/test_failfast.py tests/faults/test_worker.py

# A virtualenv per Python (.venv-3.13, ...), the interpreter from pyenv or PATH; without it,
# tools/find_python.sh stops naming what to install.
.venv-%/.installed: pyproject.toml
	python=$$(sh tools/find_python.sh $*) && "$$python" -m venv .venv-$*
	.venv-$*/bin/python -m pip install --quiet --upgrade pip
	.venv-$*/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

## test-py: PY_TESTS on Python PY_VERSION (default 3.13) in its own .venv-PY_VERSION, e.g.
## `make test-py PY_VERSION=3.12`
test-py: .venv-$(PY_VERSION)/.installed servers
	.venv-$(PY_VERSION)/bin/python -m pytest $(PY_TESTS) $(PYTEST_ARGS)

## test-pythons: test-py on each of PY_VERSIONS (CI runs it); every one runs, and it fails if any did
test-pythons:
	@failed=""; for version in $(PY_VERSIONS); do \
		$(MAKE) --no-print-directory test-py PY_VERSION=$$version || failed="$$failed $$version"; \
	done; if [ -n "$$failed" ]; then echo "test-pythons: failed on$$failed" >&2; exit 1; fi

## lock-check: requirements.lock installed (hashes checked, wheels only, as the images do) on
## 3.11 and each of PY_VERSIONS, and the app and worker loaded from it (tools/lockcheck.py)
lock-check: $(VENV)/.installed
	$(PY) -m tools lock-check 3.11 $(PY_VERSIONS)

## check: lint, format check, types, import contracts, links in the Markdown files (pyproject.toml)
check: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy sql/migrations  # migrations written in Python: files, not a package
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/rumdl check .  # relative links and #anchors resolve ([tool.rumdl]); no web fetch

fmt: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

migrate: $(VENV)/.installed
	$(PY) -m service migrate

## down: stop the private PostgreSQL and Redis that `make run` or the tests may have started
down: $(VENV)/.installed
	$(PY) -m tools down

# What the benchmark runs besides PostgreSQL and Redis: wrk (the load) and PgBouncer (the
# service-pgbouncer system).
BENCH_PACKAGES := wrk:wrk pgbouncer:pgbouncer

## bench: the benchmark against the Flask original and the bare ASGI ceiling (bench/README.md);
## BENCH_ARGS='--quick' for a smoke run
bench: $(VENV)/.installed
	sh tools/debian_packages.sh $(BENCH_PACKAGES)
	$(PY) -m bench $(BENCH_ARGS)
## doctor: check the running service (DOCTOR_ARGS='--url http://host:port'): server, event
## loops, indexes, connections, Redis and the cache, the worker
doctor: $(VENV)/.installed
	$(PY) -m service doctor $(DOCTOR_ARGS)

## lock: re-resolve requirements.lock (the images install exactly it) from pyproject.toml
lock: $(VENV)/.installed
	$(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 \
		--generate-hashes --quiet --output-file requirements.lock

## images: build the API and worker images with Buildah (installed from Debian if missing); the
## base is PYTHON_IMAGE if it can be pulled, else one made from Debian packages (tools/images.py)
images: $(VENV)/.installed
	$(PY) -m tools images

## image-test: run the built images with podman against this machine's PostgreSQL and Redis
## (tests/images/; `make images` first)
image-test: $(VENV)/.installed
	$(PY) -m pytest tests/images $(PYTEST_ARGS)

## scale-out: two APIs and two workers on one machine, sharing PostgreSQL and Redis
## (SCALE_OUT_ARGS='--tasks 4 --n 100000' for a shorter run)
scale-out: $(VENV)/.installed
	$(PY) -m tools scale-out $(SCALE_OUT_ARGS)

## cluster-test: (as root) PostgreSQL, Redis, two APIs, two workers and HAProxy on network-namespace
## hosts; each host failure in turn under mixed load; the per-fault table (bench/results/cluster-*.json)
cluster-test: $(VENV)/.installed
	sh tools/debian_packages.sh haproxy:haproxy curl:curl
	$(PY) -m tools cluster-test

## prometheusrule: write deploy/k8s/components/monitoring/prometheusrule.yaml from
## deploy/prometheus/rules.yml (the rules' one source; tests/deploy/test_k8s.py compares them)
prometheusrule: $(VENV)/.installed
	$(PY) -m tools prometheusrule

## soak: mixed load for 10 minutes, then memory and descriptors judged flat or not
## (bench/README.md); SOAK_ARGS='--quick' for 60 s, SOAK_ARGS='--duration 3600' for an hour
soak: $(VENV)/.installed
	$(PY) -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .venv-*/ .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
