# Two commands on a fresh clone with only python3:  make dev  (a local cluster)  and  make test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install dev test lint proto bench clean

$(BIN)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# The client first: the server depends on discovery-client, which no index has.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ./clients/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# xds-protos ships an old copy of opentelemetry/proto over opentelemetry-proto's (grpc/grpc#42926),
	@# which breaks the OTLP exporters; put the real one back (tests/xds/test_packaging.py checks).
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	touch $@

install: $(BIN)/.installed

dev: install  ## etcd and a discovery server per region on 127.0.0.1, in the foreground
	$(BIN)/discovery dev $(ARGS)

lint: install
	$(BIN)/ruff check discovery tests scripts bench clients
	$(BIN)/ruff format --check discovery tests scripts bench clients
	$(BIN)/mypy

test: lint  ## lint, types, then the whole suite against real etcd processes
	$(BIN)/python -m pytest $(PYTEST_ARGS)

proto: install  ## regenerate clients/python/discovery_pb/ from proto/
	$(BIN)/python scripts/gen_proto.py

bench: install
	$(BIN)/python bench/resolve_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
