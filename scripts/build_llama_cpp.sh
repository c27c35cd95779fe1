#!/usr/bin/env bash
# llama.cpp's command-line tools (llama-completion, llama-batched-bench), built once from the llama-cpp-python source package on PyPI (it vendors
# llama.cpp), for the tests that run a real llama.cpp on the GGUF LoRA export. Cached per version and CPU kind
# (the build is for this CPU: GGML_NATIVE) in $LORA_LENS_CACHE/llama.cpp-VERSION-CPU; about 5.5 minutes on 2
# cores the first time, nothing after. Also keeps llama.cpp's own convert_lora_to_gguf.py and gguf-py beside
# the binaries, so the tests can compare the project's export with what the converter writes.
set -euo pipefail

VERSION="0.3.36"
PYTHON="${PYTHON:-python3}"
CACHE="${LORA_LENS_CACHE:-$HOME/.cache/lora-lens}"
FLAGS="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
CPU=generic
for kind in avx2 avx512f avx512_bf16; do  # the widest this CPU has: a native build runs on its own kind only
  case " $FLAGS " in *" $kind "*) CPU="$kind" ;; esac
done
TARGET="$CACHE/llama.cpp-$VERSION-$CPU"

if [ -x "$TARGET/bin/llama-completion" ] && [ -x "$TARGET/bin/llama-batched-bench" ] \
  && [ -f "$TARGET/convert_lora_to_gguf.py" ]; then
  echo "llama.cpp $VERSION: $TARGET"
  exit 0
fi
for tool in cmake c++; do
  command -v "$tool" >/dev/null || { echo "llama.cpp needs $tool (Debian: apt-get install cmake g++)"; exit 1; }
done

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
tar -xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF >"$WORK/cmake.log"
cmake --build "$WORK/build" --target llama-completion llama-batched-bench -j "$(nproc)" >"$WORK/build.log"

mkdir -p "$TARGET.partial/bin"
cp "$WORK/build/bin/llama-completion" "$WORK/build/bin/llama-batched-bench" "$TARGET.partial/bin/"
cp "$SRC"/convert_lora_to_gguf.py "$SRC"/convert_hf_to_gguf.py "$TARGET.partial/"
[ -d "$SRC/conversion" ] && cp -r "$SRC/conversion" "$TARGET.partial/"
cp -r "$SRC/gguf-py" "$TARGET.partial/"
rm -rf "$TARGET"
mv "$TARGET.partial" "$TARGET"
echo "llama.cpp $VERSION: $TARGET"
