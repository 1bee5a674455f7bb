#!/usr/bin/env bash
# GPU side of the kernel benchmark: run from the repository root on a CUDA machine.
#   1. correctness of the Triton kernels on the GPU (float64 references; exits non-zero on failure)
#   2. the timing / memory table at Liger's and CCE's shapes (extra args go to bench.py, e.g. --frozen-head)
# Liger-Kernel and Cut Cross-Entropy are optional: `pip install liger-kernel cut-cross-entropy`
# beforehand to include them; missing libraries are skipped with a printed reason.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
python kernels/bench.py --check
python kernels/bench.py --gpu "$@"
