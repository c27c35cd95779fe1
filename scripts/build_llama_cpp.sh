#!/usr/bin/env bash
# llama.cpp's command-line tools (llama-completion, llama-batched-bench), built once from the llama-cpp-python source package on PyPI (it vendors
# llama.cpp), for the tests that run a real llama.cpp on the GGUF LoRA export. Cached per version and CPU
# (the build is for this CPU: GGML_NATIVE) in $LORA_LENS_CACHE/llama.cpp-VERSION-CPU-FLAGSHASH; about 5.5 minutes on 2
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
# and the whole flag list's hash: a native build for one CPU of a kind may use an instruction another lacks (an
# Intel Xeon's avx512_fp16 build on an AMD EPYC, both avx512_bf16), where a shared cache would crash it
# Without llama.cpp's AMX matrix code where the CPU lists AMX: built here (GCC 12), its first AMX product faults
# in ldtilecfg (a general-protection fault: the tile configuration it loads from the stack has garbage where tiles
# 8-15, unused, must be zero) on an Intel Xeon with amx_tile, so every llama.cpp run crashed there; its AVX-512
# code serves instead.
EXTRA_FLAGS=""
case " $FLAGS " in *" amx_tile "*) EXTRA_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;; esac
TARGET="$CACHE/llama.cpp-$VERSION-$CPU-$(printf '%s' "$FLAGS$EXTRA_FLAGS" | sha256sum | cut -c1-8)"
# LLAMA_CPP_AVX2_ONLY=1: llama.cpp's portable AVX2 build instead (AVX, AVX2, FMA, F16C, BMI2; no AVX-512), the
# llama.cpp an AVX2-only CPU runs, for bench/bench_llama_cpp.py --as-avx2 on a CPU that has AVX-512
NATIVE=ON
if [ "${LLAMA_CPP_AVX2_ONLY:-0}" = 1 ]; then
  TARGET="$CACHE/llama.cpp-$VERSION-avx2-portable"
  NATIVE=OFF
fi

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
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=$NATIVE -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_C_FLAGS="$EXTRA_FLAGS" -DCMAKE_CXX_FLAGS="$EXTRA_FLAGS" \
  >"$WORK/cmake.log"
cmake --build "$WORK/build" --target llama-completion llama-batched-bench -j "$(nproc)" >"$WORK/build.log"

mkdir -p "$TARGET.partial/bin"
cp "$WORK/build/bin/llama-completion" "$WORK/build/bin/llama-batched-bench" "$TARGET.partial/bin/"
cp "$SRC"/convert_lora_to_gguf.py "$SRC"/convert_hf_to_gguf.py "$TARGET.partial/"
[ -d "$SRC/conversion" ] && cp -r "$SRC/conversion" "$TARGET.partial/"
cp -r "$SRC/gguf-py" "$TARGET.partial/"
rm -rf "$TARGET"
mv "$TARGET.partial" "$TARGET"
echo "llama.cpp $VERSION: $TARGET"
