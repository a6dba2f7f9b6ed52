# snapfs: `make demo` and `make test` are the only commands a fresh Debian 12 machine needs.
# Both install what is missing: Debian packages (as root, via apt-get) and a virtualenv in .venv.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config libaio1 e2fsprogs util-linux fio psmisc bubblewrap
BENCH_PACKAGES := qemu-system-common qemu-utils fio postgresql borgbackup

.PHONY: all deps venv demo test quick lint benchdeps bench soak clean

all: test

# Debian packages the build and the tests need; installed only when missing.
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to install:$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.stamp: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.stamp

demo: venv
	$(PY) tools/demo.py

lint: venv
	$(VENV)/bin/ruff check snapfs tests tools

test: venv
	$(VENV)/bin/ruff check snapfs tests tools
	$(VENV)/bin/pytest -q

# the suite without the 3-minute soak (tests/test_soak.py)
quick: venv
	$(VENV)/bin/ruff check snapfs tests tools
	$(VENV)/bin/pytest -q -m 'not soak'

# issue 24: PostgreSQL, backups, snapshots, overflows, crashes and restarts for 60 minutes
# (SOAK_ARGS=--keep keeps its scratch directory; .venv/bin/python tools/soak --minutes N: another length)
soak: venv benchdeps
	$(PY) tools/soak --minutes 60 $(SOAK_ARGS)

# the Debian packages of the benchmark and the soak (PostgreSQL, QEMU, borg)
benchdeps:
	@missing=""; for p in $(BENCH_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

bench: venv benchdeps
	$(PY) tools/bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
