"""Per-GPU memory of LoRA preference training under each strategy: the plan in README "Scaling".

Everything is computed from the architecture and the training settings; `python benchmarks/memory_plan.py`
prints the table, `benchmarks/gpu_check.py` compares it with a measured peak. Assumptions (the paper's
cDPO setup): bf16 base weights, LoRA adapters with fp32 master weights, fp32 gradients and AdamW
state (PEFT's default), micro-batch of 2 pairs = 4 sequences of max_length tokens per GPU, gradient
checkpointing per decoder block, SDPA / flash attention (no [T, T] score matrix kept), reference
log-probs precomputed or computed without gradients (nothing of the reference is kept for backward).
Not included: the CUDA context and allocator fragmentation (typically 1-3 GiB), NCCL buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3", "zero3_offload", "qlora")
NF4_BYTES = 4.127 / 8  # 4-bit NF4 + double-quantised block constants (QLoRA paper: 0.127 bit per parameter)
HEAD_CHUNK_ROWS = 1024  # cdpo.head.token_logprobs_from_hidden chunk_size


@dataclass(frozen=True)
class Arch:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_hf_config(cls, config, name: str | None = None) -> "Arch":
        return cls(name or getattr(config, "_name_or_path", "model"), config.num_hidden_layers, config.hidden_size,
                   config.intermediate_size, config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None) or config.num_attention_heads, config.vocab_size,
                   bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def block_params(self) -> int:
        return sum(a * b for a, b in self.projections().values()) + 2 * self.hidden  # + two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.embedding_params
        return self.embedding_params + self.layers * self.block_params + self.hidden + head

    def lora_params(self, r: int, targets=PAPER_TARGETS) -> int:
        return self.layers * sum(r * (a + b) for name, (a, b) in self.projections().items() if name in targets)


LLAMA3_8B = Arch("Llama-3-8B", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
LLAMA3_70B = Arch("Llama-3-70B", layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256)


def activation_bytes(arch: Arch, tokens: int) -> dict[str, float]:
    """Activation memory of one micro-batch of `tokens` tokens (all sequences together), bf16."""
    h, i, kv = arch.hidden, arch.intermediate, arch.kv_dim
    # what one block saves for its backward while it is recomputed, per token (an estimate): about 8
    # hidden-sized values (norm outputs, q, attention and projection outputs, residual sums), k and v,
    # and 4 intermediate-sized ones (gate, up, silu(gate), their product)
    block_working_set = tokens * (8 * h + 2 * kv + 4 * i) * 2
    return {
        "checkpointed block inputs": arch.layers * tokens * h * 2,
        "one block recomputed": block_working_set,
        # cdpo.losses: the head upcast to fp32 is an input of each checkpointed chunk, so one copy per
        # log-prob call (chosen, rejected) lives until backward; plus one chunk of fp32 logits (x2 for softmax)
        "head (fp32 copies + a logits chunk)": 2 * arch.vocab * h * 4 + 2 * HEAD_CHUNK_ROWS * arch.vocab * 4,
    }


def plan(arch: Arch, strategy: str, gpus: int, *, r: int = 16, targets=PAPER_TARGETS, max_length: int = 1500,
         pairs_per_gpu: int = 2) -> dict[str, float]:
    """Bytes per GPU, by component, for LoRA training of `arch` under `strategy` on `gpus` GPUs."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    n = gpus
    lora = arch.lora_params(r, targets)
    sharded_states = strategy in ("fsdp", "zero2", "zero3", "zero3_offload")
    out: dict[str, float] = {}
    if strategy == "qlora":
        # linear layers in NF4; embeddings, head and norms stay bf16
        linear = arch.layers * sum(a * b for a, b in arch.projections().values())
        out["base weights"] = linear * NF4_BYTES + (arch.params - linear) * 2
    elif strategy in ("ddp", "zero2"):
        out["base weights"] = arch.params * 2
    else:  # fsdp, zero3: this GPU's shard; zero3_offload: the shards wait in host memory
        out["base weights"] = 0.0 if strategy == "zero3_offload" else arch.params * 2 / n
    gathers = strategy in ("fsdp", "zero3", "zero3_offload")
    # the block in use and the one prefetched; FSDP's root unit (embeddings, head) stays gathered
    out["gathered blocks"] = 2 * arch.block_params * 2 if gathers else 0.0
    head = 0 if arch.tied else arch.embedding_params
    out["gathered embeddings + head"] = (arch.embedding_params + head) * 2 if gathers else 0.0
    out["LoRA weights (fp32)"] = lora * 4 / (n if gathers else 1)  # ZeRO-2 shards only gradients and optimizer
    out["LoRA gradients (fp32)"] = lora * 4 / (n if sharded_states else 1)
    out["AdamW state (fp32)"] = 0.0 if strategy == "zero3_offload" else lora * 8 / (n if sharded_states else 1)
    out.update(activation_bytes(arch, 2 * pairs_per_gpu * max_length))
    return out


def total_gib(parts: dict[str, float]) -> float:
    return sum(parts.values()) / GIB


def plan_table(archs=(LLAMA3_8B, LLAMA3_70B), gpus: int = 8, **kw) -> str:
    """Markdown: GiB per GPU for each strategy and model."""
    head = "| strategy | GPUs | " + " | ".join(f"{a.name} GiB / GPU" for a in archs) + " |"
    lines = [head, "|---|---|" + "---|" * len(archs)]
    for s in STRATEGIES:
        n = 1 if s == "qlora" else gpus
        cells = [f"{total_gib(plan(a, s, n, **kw)):.1f}" for a in archs]
        lines.append(f"| {s} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_table(arch: Arch, gpus: int = 8, **kw) -> str:
    """Markdown: each component (GiB per GPU) for every strategy, one model."""
    plans = {s: plan(arch, s, 1 if s == "qlora" else gpus, **kw) for s in STRATEGIES}
    parts = list(dict.fromkeys(k for p in plans.values() for k in p))
    lines = [f"| {arch.name} | " + " | ".join(STRATEGIES) + " |", "|---|" + "---|" * len(STRATEGIES)]
    for part in parts:
        lines.append(f"| {part} | " + " | ".join(f"{plans[s].get(part, 0.0) / GIB:.2f}" for s in STRATEGIES) + " |")
    lines.append("| **total** | " + " | ".join(f"**{total_gib(plans[s]):.1f}**" for s in STRATEGIES) + " |")
    return "\n".join(lines)
