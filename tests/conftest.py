import os

# Triton kernels run on CPU tensors only under the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
