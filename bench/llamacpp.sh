#!/usr/bin/env bash
# Builds llama.cpp's llama-bench and llama-server from the llama-cpp-python
# sdist on PyPI (which vendors llama.cpp), into a cache outside the repo, and
# prints the directory holding the binaries. Sourced by the comparison
# scripts; safe to run again (it reuses the build).
set -euo pipefail

LLAMACPP_PY_VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
CACHE="${HOTPOT_BENCH_CACHE:-$HOME/.cache/hotpot-bench}"
SRC="$CACHE/llama-cpp-python-$LLAMACPP_PY_VERSION"
BUILD="$SRC/vendor/llama.cpp/build"

if [ -x "$BUILD/bin/llama-bench" ] && [ -x "$BUILD/bin/llama-server" ]; then
    echo "$BUILD/bin"
    exit 0
fi

mkdir -p "$CACHE"
if ! command -v cmake >/dev/null 2>&1; then
    echo "installing cmake" >&2
    apt-get update -qq >&2 && apt-get install -y -qq cmake >&2
fi
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    echo "downloading llama-cpp-python $LLAMACPP_PY_VERSION (sdist) from PyPI" >&2
    python3 -m pip download --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMACPP_PY_VERSION" -d "$CACHE" >&2
    tar -xzf "$CACHE/llama_cpp_python-$LLAMACPP_PY_VERSION.tar.gz" -C "$CACHE"
    mv "$CACHE/llama_cpp_python-$LLAMACPP_PY_VERSION" "$SRC"
fi

# The instruction sets this CPU has (machines of this kind differ: some
# have AVX-512 with VNNI, some only AVX2); AMX tile instructions fault on
# this kind of VM, so they stay off.
has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
AVX512="$(has avx512f)"; AVX512_VNNI="$(has avx512_vnni)"
echo "building llama-bench and llama-server (CPU: AVX2, AVX-512 $AVX512, VNNI $AVX512_VNNI, no AMX)" >&2
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512="$AVX512" -DGGML_AVX512_VNNI="$AVX512_VNNI" -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_BF16=OFF \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$BUILD" --target llama-bench llama-server -j "$(nproc)" >&2
echo "$BUILD/bin"
