import os

# Triton kernels run on CPU tensors only under the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tests use tiny models: one thread avoids thread-sync stalls when the two cores are shared.
torch.set_num_threads(1)
