#!/usr/bin/env bash
# Build llama.cpp's `llama-perplexity` and `llama-imatrix` tools from exactly the
# llama.cpp sources vendored in the llama-cpp-python 0.3.36 source distribution.
#
# Usage: tests/golden/build_llama_tools.sh [OUT_DIR] [SDIST]
#   OUT_DIR  where to build (default: ~/.cache/birdbone/llama-tools).
#            Binaries end up in OUT_DIR/bin/.
#   SDIST    an unpacked llama_cpp_python-0.3.36 directory or its .tar.gz.
#            If omitted (and $LLAMA_CPP_PYTHON_SDIST is unset), it is fetched with
#            `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`
#            into ~/.cache/birdbone/sdist/.
#
# The build takes several minutes on 2 cores.
set -euo pipefail

LCP_VERSION="0.3.36"
OUT_DIR="${1:-$HOME/.cache/birdbone/llama-tools}"
SDIST="${2:-${LLAMA_CPP_PYTHON_SDIST:-}}"
JOBS="${JOBS:-2}"

mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

# --- locate / fetch the sdist -------------------------------------------------
if [[ -z "$SDIST" ]]; then
    CACHE="$HOME/.cache/birdbone/sdist"
    mkdir -p "$CACHE"
    SDIST="$CACHE/llama_cpp_python-$LCP_VERSION.tar.gz"
    if [[ ! -f "$SDIST" ]]; then
        PY="${PYTHON:-python3}"
        "$PY" -m pip download --no-deps --no-binary :all: \
            "llama-cpp-python==$LCP_VERSION" -d "$CACHE"
    fi
fi

if [[ -f "$SDIST" ]]; then
    UNPACK="$(dirname "$SDIST")"
    SRC="$UNPACK/llama_cpp_python-$LCP_VERSION"
    if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
        tar -xzf "$SDIST" -C "$UNPACK"
    fi
elif [[ -d "$SDIST" ]]; then
    SRC="$(cd "$SDIST" && pwd)"
else
    echo "error: sdist not found: $SDIST" >&2
    exit 1
fi

LLAMA_SRC="$SRC/vendor/llama.cpp"
if [[ ! -f "$LLAMA_SRC/CMakeLists.txt" ]]; then
    echo "error: no vendored llama.cpp at $LLAMA_SRC" >&2
    exit 1
fi
if ! grep -q "__version__ = \"$LCP_VERSION\"" "$SRC/llama_cpp/__init__.py"; then
    echo "error: $SRC is not llama-cpp-python $LCP_VERSION" >&2
    exit 1
fi

# --- configure & build --------------------------------------------------------
BUILD="$OUT_DIR/build"
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi

echo "building llama.cpp tools from $LLAMA_SRC into $BUILD" >&2
start=$(date +%s)
cmake -S "$LLAMA_SRC" -B "$BUILD" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF
cmake --build "$BUILD" --config Release -j"$JOBS" \
    --target llama-perplexity llama-imatrix
end=$(date +%s)

mkdir -p "$OUT_DIR/bin"
for t in llama-perplexity llama-imatrix; do
    cp -f "$BUILD/bin/$t" "$OUT_DIR/bin/$t"
done
# Record where the tools came from (the sdist ships the submodule's git metadata).
COMMIT="$(git -C "$LLAMA_SRC" rev-parse HEAD 2>/dev/null || echo unknown)"
{
    echo "source=llama-cpp-python $LCP_VERSION sdist, vendor/llama.cpp"
    echo "llama_cpp_commit=$COMMIT"
    echo "cmake_flags=-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
    echo "build_seconds=$((end - start))"
} > "$OUT_DIR/SOURCE.txt"
echo "built in $((end - start)) s: $OUT_DIR/bin/llama-perplexity $OUT_DIR/bin/llama-imatrix" >&2
