# Kakehashi: the two commands on a fresh machine are `make demo` and `make test`.
# Each creates .venv and installs what it needs when missing.

# Python 3.11. The distribution's own build is preferred when it can make a virtualenv:
# Debian builds it with profile-guided and link-time optimisation, and the nodes move
# about 13% more envelopes per second on it than on a Python built from source without
# them (docs/benchmarks.md, fifteenth round). `make PYTHON=/path/to/python3.11 ...`
# chooses another; .venv is made again when the choice changes.
SYSTEM_PYTHON := $(shell /usr/bin/python3.11 -c 'import ensurepip, venv' 2>/dev/null \
	&& echo /usr/bin/python3.11)
PYTHON ?= $(or $(SYSTEM_PYTHON),python3)
VENV   := .venv
BIN    := $(VENV)/bin
# Reinstall when the project's dependencies or the chosen interpreter change.
STAMP  := $(VENV)/.installed-$(shell { cksum pyproject.toml; echo '$(PYTHON)'; } | cksum | cut -d' ' -f1)

.PHONY: demo test bench lint chaos clean install segments

$(STAMP): pyproject.toml
	@if test -x $(BIN)/python && test "$$(cat $(VENV)/.python 2>/dev/null)" != '$(PYTHON)'; then \
		echo "making $(VENV) again, with $(PYTHON)"; rm -rf $(VENV); fi
	@test -x $(BIN)/python || { echo "making $(VENV) with $(PYTHON) ($$($(PYTHON) -V 2>&1))" \
		&& $(PYTHON) -m venv $(VENV) && echo '$(PYTHON)' > $(VENV)/.python; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The system tests build network namespaces with `ip` (iproute2); as root on Debian,
# install it when missing. Without it (or root) they skip with the reason, or fail on CI.
# The browser tests (tests/browser) need Chromium at /usr/bin/chromium and Japanese
# fonts: installed the same way.
test: $(STAMP)
	@command -v ip >/dev/null || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null; } || true
	@test -x /usr/bin/chromium || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq chromium fonts-noto-cjk >/dev/null; } || true
	$(BIN)/python -m pytest -q

# A relay deployment across LGWAN and Internet network namespaces (needs root).
segments: $(STAMP)
	$(BIN)/python -m examples.segments.run

bench: $(STAMP)
	$(BIN)/python bench/run.py

# The reliability runs at full length: 25 rounds of each kill -9 scenario.
chaos: $(STAMP)
	KAKEHASHI_CHAOS_ROUNDS=25 $(BIN)/python -m pytest -q -m reliability tests/reliability

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict federation gateway

clean:
	rm -rf $(VENV) .demo .segments test-artifacts .pytest_cache .mypy_cache .ruff_cache
