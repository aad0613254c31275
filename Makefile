# Every target installs what it needs first: a fresh clone needs only python3 (>= 3.11) and,
# for the broker targets, RabbitMQ (a running one, or Debian's rabbitmq-server package).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-unit faults faults-cluster cluster fuzz lint docs broker postgres run run-sqlite topology bench bench-fairness bench-trickle soak definitions clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "b24queue needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,fuzz]'
	touch $(STAMP)

# Starts a project-local RabbitMQ node only when nothing listens on the AMQP port yet. Either way
# the management API must answer as guest on :15672 (the tests and `b24queue status` use it): it
# enables rabbitmq_management and rabbitmq_prometheus when the local rabbitmq-plugins can, and
# otherwise stops with one line saying what to run.
broker:
	PYTHON=$(PYTHON) bash rabbitmq/local-node.sh start

# The machine's PostgreSQL (the PostgreSQL transport's tests), started when it is down.
postgres:
	bash scripts/postgres-up.sh

# Everything but the tests marked `fault` or `long` (make faults runs those); the slowest 15
# are listed at the end: keep the whole under ten minutes on a 2-core machine.
test: install broker postgres
	$(BIN)/pytest -m "not fault and not long" --durations=15

test-unit: install
	$(BIN)/pytest tests/unit

lint: install
	$(BIN)/ruff check b24queue examples tests bench docs
	$(BIN)/ruff format --check b24queue examples tests bench docs
	$(BIN)/mypy
	$(BIN)/lint-imports
	# No Docker engine here to try it: at least the compose file must be valid compose.
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec rabbitmq/docker-compose.yml
	# The docs site: a broken link, a missing snippet or a page left out of the nav fails here.
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The docs site while you edit it (docs/, mkdocs.yml): http://127.0.0.1:8000, rebuilt on save.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

topology: install broker
	$(BIN)/b24queue topology examples.deals:DealSync examples.logger:EventLogger

# The ingress and the example workers together; Ctrl-C stops both. On RabbitMQ when one runs or
# can be started here, else on the embedded SQLite queue (said in one line); run-sqlite forces it.
run: install
	bash scripts/run-local.sh

run-sqlite: install
	B24QUEUE_BROKER_URL=sqlite:.b24queue/queue.sqlite3 bash scripts/run-local.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site

bench: install broker postgres
	$(PY) -m bench
	$(PY) -m bench.tables

# Issue 30's fairness benchmark (not part of `make bench` or `make test`): one portal's burst
# beside nineteen quiet ones, fair share off and on, on every transport (a few minutes each).
# FAIRNESS_ARGS narrows it, e.g. FAIRNESS_ARGS="--transport sqlite --burst 5000".
FAIRNESS_ARGS ?=
bench-fairness: install broker postgres
	$(PY) -m bench.fairness $(FAIRNESS_ARGS)

# Issue 35's latency at a trickle (not part of `make bench` or `make test`): ten portals at
# 5 events/s each, a 20 ms handler, accepted -> handler start on SQLite, PostgreSQL, Redis
# and Kafka (on Kafka also a bare aiokafka consumer's fetch); ~1 min a transport.
# TRICKLE_ARGS narrows it, e.g. TRICKLE_ARGS="--only kafka --cold".
TRICKLE_ARGS ?=
bench-trickle: install postgres
	$(PY) -m bench.trickle $(TRICKLE_ARGS)

# Regenerate rabbitmq/definitions.json after changing the examples or the topology.
definitions: install
	$(BIN)/b24queue topology --definitions examples.deals:DealSync examples.logger:EventLogger > rabbitmq/definitions.json

# The fault suite: its own RabbitMQ node (and PostgreSQL restarted, a Redis of its own stopped and
# killed), real processes, faults injected; prints a summary.
faults: install broker postgres
	$(BIN)/pytest tests/faults
	# Every transport: SIGKILL of a worker mid-handler; SQLite: of an ingress under load; Kafka
	# (Tansu): workers killed by a poison event, a rebalance with events open (PostgreSQL and
	# Redis restarted under load are in tests/faults; Tansu keeps memory only: no restart to test).
	$(BIN)/pytest tests/transports -m fault
	# The scenarios of many seconds make test leaves out (marked `long`).
	$(BIN)/pytest -m long

# A three-node RabbitMQ cluster on this host (rabbitmq/cluster.sh; the machine's node on 5672 is
# left alone); prints the B24QUEUE_BROKER_URL to use. `bash rabbitmq/cluster.sh stop` stops it.
cluster:
	bash rabbitmq/cluster.sh start

# Nodes of that cluster lost under load (tests/cluster, a few minutes); the cluster is stopped after.
faults-cluster: install
	bash rabbitmq/cluster.sh start
	$(BIN)/pytest tests/cluster; rc=$$?; bash rabbitmq/cluster.sh stop; exit $$rc

# Fuzzing the decoder and the whole ingress app, longer than `make test` does: atheris for
# FUZZ_SECONDS (default 180), hypothesis's hostile bodies FUZZ_EXAMPLES times (default 5000).
FUZZ_SECONDS ?= 180
FUZZ_EXAMPLES ?= 5000
fuzz: install
	FUZZ_RUNS=100000000 FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
		$(BIN)/pytest tests/security/test_fuzz.py -p no:logging -s -q

# Memory over a steady 5-minute load (ingress and worker).
soak: install broker
	$(PY) -m bench.soak
