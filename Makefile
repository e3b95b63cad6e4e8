# Two commands matter: `make serve` and `make test`. Both install into .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint format system-deps clean

install: $(STAMP)

# torch is pinned and installed first: the CPU wheel lies on disk, anything looser pulls a CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# the C++ CPU kernels (model/cpu_ext.py); a failed build only means torch's kernels
	-$(BIN)/python -m model.cpu_ext
	touch $(STAMP)

# Extra flags for dsv2 serve, e.g. make serve SERVE_ARGS="--no-ray --port 8080"
SERVE_ARGS ?=
serve: install
	$(BIN)/dsv2 serve $(SERVE_ARGS)

# Debian packages the tests need: a Redis server, Chromium for the page tests, and a CJK font
# so Chinese text renders in the page screenshots; the fonts the demo's pictures are drawn with
# (services/demo/pictures.py). Skipped when already installed.
SYSTEM_PACKAGES := redis-server chromium fonts-wqy-microhei fonts-dejavu-core fonts-dejavu-extra \
	fonts-liberation
system-deps:
	@dpkg-query -W $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null)

test: install system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
