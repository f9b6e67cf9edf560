# The two commands of the README:
#   make run   - the daemon on the example config (SQLite, loopback ports)
#   make test  - real peers, lint, types, and the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test peers lint bench-smtp-ingest bench-pull bench-retention bench-snapshot bench-imap bench-imap-stress bench-relay bench-cluster bench-sqlite-driver

$(BIN)/mailgate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/mailgate
	$(BIN)/mailgate -c config/mailgate.example.toml run

peers:
	bash .ci/install-peers

lint: $(BIN)/mailgate
	$(BIN)/ruff check .
	$(BIN)/mypy

test: peers lint
	$(BIN)/pytest

bench-smtp-ingest: $(BIN)/mailgate
	$(BIN)/python bench/smtp_ingest.py $(ARGS)

bench-pull: $(BIN)/mailgate
	$(BIN)/python bench/pull.py $(ARGS)

bench-retention: $(BIN)/mailgate
	$(BIN)/python bench/retention.py $(ARGS)

bench-snapshot: $(BIN)/mailgate
	$(BIN)/python bench/snapshot.py $(ARGS)

bench-imap: $(BIN)/mailgate
	$(BIN)/python bench/imap.py $(ARGS)

bench-imap-stress: $(BIN)/mailgate
	$(BIN)/python bench/imap_stress.py $(ARGS)

bench-relay: $(BIN)/mailgate
	$(BIN)/python bench/relay.py $(ARGS)

bench-cluster: $(BIN)/mailgate
	$(BIN)/python bench/cluster_scale.py $(ARGS)

bench-sqlite-driver: $(BIN)/mailgate
	$(BIN)/python bench/sqlite_driver.py $(ARGS)
