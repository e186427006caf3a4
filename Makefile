# Two commands do all the setup (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SHARED ?= $(abspath ../shared)
DEMO   ?= $(abspath runs/demo)
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install system-deps test test-fast demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Debian Chromium drives the Gradio page test; moto_server comes from moto[server] in the venv.
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install system-deps
	BREEDLABEL_SHARED=$(SHARED) $(BIN)/python -m pytest

# The inner loop while editing: every test not marked slow (the slow ones start Ray jobs, kill
# processes, train over Ray Train or run the README end to end; `make test` and CI run them all).
test-fast: install
	BREEDLABEL_SHARED=$(SHARED) $(BIN)/python -m pytest -m "not slow" -q

clean:
	rm -rf $(VENV) runs .pytest_cache

# The main job end to end on local Ray and local files (see scripts/demo.sh).
demo: install
	BREEDLABEL_SHARED=$(SHARED) BIN=$(BIN) scripts/demo.sh
