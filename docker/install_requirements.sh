#!/bin/sh
# The images' Python dependencies: a venv at $VENV (/opt/venv) with requirements.txt, pinned by
# constraints.txt, from the files COPY'd into $BUILD (/tmp/build). Build args it reads:
#   TORCH_INDEX  where torch comes from. Empty (the default): PyPI, whose Linux torch is the CUDA build
#                (torch 2.13.0: CUDA 13.0, NVIDIA driver >= 580, triton as constraints.txt pins it).
#                https://download.pytorch.org/whl/cu126 for nodes whose driver predates CUDA 13 (CUDA 12
#                builds run on drivers >= 525), https://download.pytorch.org/whl/cpu for a CPU-only image.
#   PIP_FLAGS    more pip flags for every install (an air-gapped build: --no-index --find-links /tmp/build).
set -eu
BUILD=${BUILD:-/tmp/build}
VENV=${VENV:-/opt/venv}
python3 -m venv "$VENV"
grep -v '^torch==' "$BUILD/constraints.txt" >"$BUILD/image-constraints.txt"  # torch's build is picked here
torch=$(grep -o '^torch==[^ ]*' "$BUILD/requirements.txt")
if [ -n "${TORCH_INDEX:-}" ]; then
    # shellcheck disable=SC2086  # PIP_FLAGS is a list of flags
    "$VENV/bin/pip" install --no-cache-dir ${PIP_FLAGS:-} --index-url "$TORCH_INDEX" "$torch"
fi
# shellcheck disable=SC2086
"$VENV/bin/pip" install --no-cache-dir ${PIP_FLAGS:-} -c "$BUILD/image-constraints.txt" -r "$BUILD/requirements.txt"
