#!/usr/bin/env bash
# Build llama-server (and llama-mtmd-cli) from the llama-cpp-python sdist on PyPI,
# which carries the whole llama.cpp tree: no prebuilt binaries, only the package
# registry. Idempotent: an existing build at PREFIX is kept.
#
#   scripts/build_llama_cpp.sh [PREFIX]
#
# PREFIX defaults to ~/.cache/mirwatch-llama/<version>. Afterwards PREFIX holds
#   bin/llama-server, bin/llama-mtmd-cli   the binaries
#   src/                                   the llama.cpp tree (convert_hf_to_gguf.py, gguf-py)
# and the script prints the llama-server path on its last line.
# Env: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), PYTHON (pip to download with),
#      JOBS (default: all cores), LLAMA_CMAKE_ARGS (extra cmake flags, e.g. -DGGML_CUDA=ON).
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
prefix="${1:-${HOME}/.cache/mirwatch-llama/${version}}"
python="${PYTHON:-python3}"
jobs="${JOBS:-$(nproc)}"

if [ -x "$prefix/bin/llama-server" ] && [ -x "$prefix/bin/llama-mtmd-cli" ] \
   && [ -f "$prefix/src/convert_hf_to_gguf.py" ]; then
  echo "llama.cpp already built in $prefix" >&2
  echo "$prefix/bin/llama-server"
  exit 0
fi

for tool in cmake g++; do
  command -v "$tool" >/dev/null || { echo "build_llama_cpp: $tool is needed (apt-get install cmake g++)" >&2; exit 1; }
done
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

mkdir -p "$prefix"
work="$(mktemp -d "${prefix}/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

"$python" -m pip download -q --no-binary :all: --no-deps -d "$work" "llama-cpp-python==${version}"
tar -xzf "$work"/llama_cpp_python-"${version}".tar.gz -C "$work"
tree="$work/llama_cpp_python-${version}/vendor/llama.cpp"
[ -f "$tree/CMakeLists.txt" ] || { echo "build_llama_cpp: no vendor/llama.cpp in the sdist" >&2; exit 1; }

# Native CPU flags are fine: the binary is built on the machine that runs it.
# shellcheck disable=SC2086
cmake -S "$tree" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
  ${LLAMA_CMAKE_ARGS:-} >"$work/cmake.log" 2>&1 || { tail -30 "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" -j "$jobs" --target llama-server llama-mtmd-cli >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log" >&2; exit 1; }

# The converter and its gguf-py make tiny test GGUFs from transformers checkpoints.
rm -rf "$prefix/src" "$prefix/bin.new"
mkdir -p "$prefix/src" "$prefix/bin.new"
cp "$tree/convert_hf_to_gguf.py" "$prefix/src/"
cp -r "$tree/gguf-py" "$prefix/src/gguf-py"
[ -d "$tree/conversion" ] && cp -r "$tree/conversion" "$prefix/src/conversion"
cp "$work/build/bin/llama-server" "$work/build/bin/llama-mtmd-cli" "$prefix/bin.new/"
rm -rf "$prefix/bin" && mv "$prefix/bin.new" "$prefix/bin"
echo "$prefix/bin/llama-server"
