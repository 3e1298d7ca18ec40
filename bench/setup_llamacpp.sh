#!/usr/bin/env bash
# Build the llama.cpp peer for the generation and serving benchmarks: llama-cpp-python compiled
# from its sdist (the llama.cpp it vendors), CPU only, tuned for this machine, with its `[server]`
# extra (the OpenAI-compatible `python -m llama_cpp.server` that bench_serve.py runs), in a venv
# of its own that lmforge's never sees.
#
#   bash bench/setup_llamacpp.sh [VENV]        # VENV defaults to /work/peer/llama-venv
#
# Then, e.g.:
#   VENV/bin/python bench/peer_llamacpp.py MODEL.gguf --threads 2 --new-tokens 128 \
#       --prompt-tokens 32 --prefill 512 --runs 3
#
# Takes ~15 minutes on 2 cores. Needs python3 (with venv), a C/C++ compiler and CMake >= 3.21
# (ninja optional). Re-running on an existing venv with the same version installed does nothing.
set -euo pipefail

VENV="${1:-/work/peer/llama-venv}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"

# GGML_NATIVE: -march=native for the CPU backend. No BLAS (ggml's own matmul kernels, as
# llama.cpp's default CPU build), no CUDA. OpenMP stays on (the default) for the thread pool.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
export FORCE_CMAKE=1

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if "$VENV/bin/python" -c "import llama_cpp, llama_cpp.server.app, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python[server] $VERSION already in $VENV"
    exit 0
fi

"$VENV/bin/pip" install --upgrade pip >/dev/null
# --no-binary: compile the sdist here even where a wheel would be found; --no-cache-dir: never
# reuse a wheel built earlier with other flags. The [server] extra's own dependencies (uvicorn,
# fastapi, ...) come as ordinary wheels; only llama-cpp-python itself is compiled.
"$VENV/bin/pip" install -v --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python[server]==$VERSION"

"$VENV/bin/python" - <<'EOF'
import llama_cpp
print("llama-cpp-python", llama_cpp.__version__)
print(llama_cpp.llama_print_system_info().decode().strip())
EOF
