# palsd: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv system-deps lint typecheck unit integration bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,sim]'
	touch $(STAMP)

# System packages the tests use: Mosquitto (MQTT broker), promtool, systemd-analyze.
system-deps:
	@need=""; \
	command -v mosquitto >/dev/null || need="$$need mosquitto mosquitto-clients"; \
	command -v promtool >/dev/null || need="$$need prometheus"; \
	command -v systemd-analyze >/dev/null || need="$$need systemd"; \
	if [ -n "$$need" ]; then \
	  echo "installing system packages:$$need"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$need; \
	fi

run: venv
	$(BIN)/palsd demo --gpus 4 --servers 2 --workdir run

lint: venv
	$(BIN)/ruff check palsd tests tools
	$(BIN)/ruff format --check palsd tests tools

typecheck: venv
	$(BIN)/mypy

test: venv system-deps
	$(BIN)/ruff check palsd tests tools
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) run out build *.egg-info
