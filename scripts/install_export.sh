#!/usr/bin/env bash
# Installs the `export` extra (GGUF for llama.cpp / Ollama): the gguf writer and llama-cpp-python,
# built from its source package (it compiles llama.cpp with cmake + a C++ compiler, 5-15 minutes
# on 2 cores the first time; pip caches the built wheel, so later runs take seconds).
# Idempotent: does nothing when both are already installed at the pinned versions.
# The pins are those of pyproject.toml's `export` extra; pip is given the installed packages as
# constraints so that it never moves a package the project pins (torch, transformers, numpy, ...).
set -euo pipefail
GGUF_VERSION=0.19.0
LLAMA_CPP_PYTHON_VERSION=0.3.36
PY=${PYTHON:-python}

have() {  # have DIST VERSION: is DIST==VERSION installed?
    "$PY" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(0 if version(sys.argv[1]) == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}

# Go's text/template renders the Ollama Modelfile's TEMPLATE in tests/test_export.py (Ollama's engine).
if ! command -v go >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends golang-go >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends golang-go >/dev/null; }
    else
        echo "install_export: go not found; install Go (golang-go) for the Modelfile template test" >&2
    fi
fi

if have gguf "$GGUF_VERSION" && have llama_cpp_python "$LLAMA_CPP_PYTHON_VERSION"; then
    echo "install_export: gguf $GGUF_VERSION and llama-cpp-python $LLAMA_CPP_PYTHON_VERSION already installed"
    exit 0
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# Editable and direct-URL lines cannot be constraints; everything else is held where it is.
"$PY" -m pip freeze --exclude-editable | grep -v -e ' @ ' -e '^-e' \
    | grep -v -i -e '^gguf==' -e '^llama[-_]cpp[-_]python==' > "$constraints" || true

# CPU build of llama.cpp; its tests, examples, tools and server are not needed by the binding.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
"$PY" -m pip install -q -c "$constraints" "gguf==$GGUF_VERSION"
"$PY" -m pip install -q -c "$constraints" --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
"$PY" -c "import gguf, llama_cpp; print('install_export: gguf', gguf.__version__ if hasattr(gguf, '__version__') else '$GGUF_VERSION', 'llama_cpp', llama_cpp.__version__)"
