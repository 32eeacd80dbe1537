# RelayGate: `make run` and `make test` work on a fresh Debian machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
DEBS := swaks postfix chromium postgresql systemd pebble gcc libfuse2 strace

.PHONY: run test lint fmt soak bench debs clean

# Bytecode is cached even where the environment says PYTHONDONTWRITEBYTECODE (it goes to the
# gitignored __pycache__ folders): the suite starts a few hundred relaygate processes, and each
# compiled the package's ~110 modules from source (0.2-0.3 s of CPU apiece), and every xdist worker
# rewrote and compiled every test module again at collection.
unexport PYTHONDONTWRITEBYTECODE

# constraints.txt holds the versions the suite last passed with, so a fresh machine installs those.
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,dev]'
	touch $@

# The benchmark's extras: matplotlib for the plot in docs/benchmarks.png, py-spy for the profiles.
$(BENCH_STAMP): $(TEST_STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,dev,bench]'
	touch $@

run: $(STAMP)
	$(BIN)/relaygate serve

# Debian packages the tests drive: swaks (an independent SMTP client), postfix (smtp-sink, smtp-source),
# chromium (the admin centre tests, through Playwright with executable_path), postgresql (the tests
# start their own throwaway server from its binaries, tests/support/postgres.py; the system's own
# server, which Debian starts on installation, is stopped as postfix is), systemd (systemd-analyze
# verifies packaging/relaygate.service), pebble (Let's Encrypt's ACME test server: tests/acme/), gcc
# (builds tests/support/fsync_fault.c, the LD_PRELOAD shim that fails a WAL's fsync), libfuse2
# (fusepy's library: tests/support/lazy_fs.py, the file system of the power-cut tests, mounted as
# root with mount(2), so fusermount is not needed), strace (tests/smtp/test_fsync_audit.py: the
# queue's files synced before each 250, security-bar item 168).
debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  $$SUDO systemctl disable --now postfix >/dev/null 2>&1 || $$SUDO postfix stop >/dev/null 2>&1 || true; \
	  case "$$missing" in *postgresql*) \
	    $$SUDO systemctl disable --now postgresql >/dev/null 2>&1 || $$SUDO service postgresql stop >/dev/null 2>&1 || true;; \
	  esac; \
	fi

# Three xdist workers on two cores: most tests wait on sockets and timers, not the CPU (a run with
# three used 1,150 CPU seconds in 800 s of wall time; with two it took 1,100 s).
test: $(TEST_STAMP) debs
	$(BIN)/pytest -q -n 3 --dist loadfile

soak: $(TEST_STAMP) debs
	$(BIN)/pytest -q -m slow

bench: $(BENCH_STAMP) debs
	$(BIN)/python bench/run.py

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

fmt: $(TEST_STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) relaygate-data
