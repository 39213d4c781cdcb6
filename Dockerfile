# Llama-2 server image with the weights baked in (seed 000's command). From the repository root:
#
#   docker build --build-arg LLAMA_VERSION=llama-2-7b --build-arg SRC_DIR=/home/kaito/presets/llama-2 \
#     -t llama-2-7b:latest .
#
# The weights are in llama/<LLAMA_VERSION>/ of the repository (Meta's layout or a HuggingFace
# LlamaForCausalLM folder). SRC_DIR is read as a name, not copied: its last folder picks the server,
# llama-2 (POST /generate) or llama-2-chat (POST /chat).
#
# Seeds 000, 001 and 002 document three commands for this one image: ./Dockerfile,
# docker/presets/llama-2/Dockerfile and docker/presets/inference/llama-2/Dockerfile take one each. They
# differ only in the names of their build args; presets/tools/llama_image.py does the steps for all three.
# The default base is a plain Python image: pip then takes torch's CUDA build from PyPI (it carries the
# CUDA runtime and triton; the node needs only the NVIDIA driver, >= 580 for PyPI's CUDA 13.0 build).
# TORCH_INDEX picks another torch build (https://download.pytorch.org/whl/cu126 for older drivers, .../cpu
# for CPU nodes): docker/install_requirements.sh. Air-gapped: put wheels in .wheelhouse/ and pass
# PIP_FLAGS="--no-index --find-links /tmp/build". See docs/operations.md, "Docker images and Kaito".

ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

# 1. Dependencies (change rarely): a venv with the pinned requirements.
ARG PIP_FLAGS=""
ARG TORCH_INDEX=""
COPY requirements.txt constraints.txt docker/install_requirements.sh .wheelhouse* /tmp/build/
RUN PIP_FLAGS="${PIP_FLAGS}" TORCH_INDEX="${TORCH_INDEX}" sh /tmp/build/install_requirements.sh && rm -rf /tmp/build
# Read-only root: the server writes only to /tmp (the temporary folder, and HOME: Triton's, CUDA's and
# HuggingFace's caches) and /dev/shm (NCCL), both mounted writable; no bytecode is written beside the code.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/presets \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# 2. Code (changes often): the presets package and the chosen server, in Kaito's layout.
ARG SRC_DIR=""
ARG LLAMA_VERSION=""
COPY presets /opt/presets/presets
WORKDIR /workspace/llama/llama-2
RUN python -m presets.tools.llama_image server "SRC_DIR=${SRC_DIR}" "LLAMA_VERSION=${LLAMA_VERSION}"

# 3. Weights (largest, last) and the version.
ARG VERSION=0.0.1
# Owned by the server's user: files saved by safetensors (mode 600) are then readable by it.
COPY --chown=1000:1000 llama/${LLAMA_VERSION} weights/
RUN python -m presets.tools.llama_image weights "LLAMA_VERSION=${LLAMA_VERSION}" "VERSION=${VERSION}"

# A numeric non-root user (Kubernetes' runAsNonRoot can check it), with no passwd entry; run as this UID, the
# weights' owner (another UID reads only weights that are readable by all).
USER 1000:1000
EXPOSE 5000
# One GPU (7B). Kaito replaces this with
# "cd /workspace/llama/llama-2 && torchrun <flags> inference_api.py --max_seq_len 512 --max_batch_size 8".
CMD ["torchrun", "--nproc_per_node", "1", "inference_api.py", "--max_seq_len", "512", "--max_batch_size", "8"]
