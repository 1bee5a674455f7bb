"""cDPO fits of a tiny LoRA policy under Lightning strategies, for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT.json [deepspeed]

Under torchrun (2 CPU processes, gloo) it runs, each on the same global batch of 4 pairs (2 per
process): DDP; DDP whose gradient all-reduce is replaced by a no-op (a control that must diverge);
FSDP in fp32; FSDP with a bf16 base and fp32 adapters (with `deepspeed`: DeepSpeed ZeRO-2 alone). Rank 0 writes per-step losses (averaged over
the processes), the gathered adapter and checks of what trained. `fit(..., world=1)` is the
one-process reference the test runs itself. No precomputed reference log-probs: every step runs the
reference forward with the adapter disabled, under each strategy's wrapping and sharding.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdpo import distributed  # noqa: E402
from cdpo.models import add_lora, save_adapter, tiny_llama  # noqa: E402
from cdpo.modules import PairsDataModule, PreferenceModule  # noqa: E402
from cdpo.objectives import build  # noqa: E402

GLOBAL_BATCH, N_PAIRS, EPOCHS = 4, 16, 1  # 4 optimizer steps
LAYER = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"
LORA = dict(r=4, alpha=8, dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def pairs() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(N_PAIRS):
        lp, lc, lr = 3 + i % 4, 4 + (i * 3) % 5, 3 + (i * 5) % 6  # varied lengths: padding differs per process
        ids = lambda k: torch.randint(3, 128, (k,), generator=gen).tolist()  # noqa: E731
        out.append({"prompt_ids": ids(lp), "chosen_ids": ids(lc), "rejected_ids": ids(lr),
                    "chosen_p_ce": torch.rand(lc, generator=gen).tolist(),
                    "rejected_p_ce": torch.rand(lr, generator=gen).tolist()})
    return out


def policy(dtype=torch.float32):
    model = add_lora(tiny_llama(seed=0).to(dtype), "policy", **LORA)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero (policy == reference); make the adapter matter from step 1
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


class _CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy on CPU processes (gloo). Lightning itself refuses FSDP without a GPU,
    and passes `device_id=None` on CPU, which torch's FSDP rejects; only that argument differs."""

    def _setup_model(self, model):
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


class _CPUFSDPPrecision(FSDPPrecision):
    """bf16-mixed autocasts CUDA ops (Lightning's FSDPPrecision); CPU processes need the CPU autocast."""

    def forward_context(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)


class _NoSyncDDPStrategy(DDPStrategy):
    """The control: DDP whose gradient all-reduce does nothing, so each process steps on its own
    gradient. (Lightning registers communication hooks on CUDA only; torch's DDP takes them on CPU.)"""

    def _register_ddp_hooks(self):
        self.model.register_comm_hook(None, _no_allreduce)


def _no_allreduce(state, bucket):
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _cpu_deepspeed(stage: int):
    """Lightning's DeepSpeed strategy on CPU processes (DS_ACCELERATOR=cpu, gloo). Lightning refuses it
    without CUDA and gives DeepSpeed the device index None (CPU devices have none), which DeepSpeed's
    engine compares with 0; only those two differ from the GPU strategy."""
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        def setup_environment(self):
            DDPStrategy.setup_environment(self)  # skips the CUDA-accelerator check

        def setup_distributed(self):  # without the check that the device indices are GPU indices
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        @property
        def root_device(self):
            return torch.device("cpu", self.local_rank)

    strategy = distributed.build_strategy({"name": "deepspeed", "stage": stage, "process_group_backend": "gloo"})
    strategy.__class__ = CPUDeepSpeedStrategy
    return strategy


def strategy_for(kind: str):
    if kind == "zero2":
        return _cpu_deepspeed(2)
    if kind == "ddp":
        return distributed.build_strategy({"name": "ddp"})
    if kind == "ddp_no_sync":
        return _NoSyncDDPStrategy()
    strategy = distributed.build_strategy({"name": "fsdp", "auto_wrap_policy": [LAYER],
                                           "sharding_strategy": "FULL_SHARD"})
    strategy.__class__ = _CPUFSDPStrategy  # the factory's arguments, the CPU device
    return strategy


class _RecordLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


def distributed_order() -> list[int]:
    """The permutation Lightning's DistributedSampler (shuffle, seed 0, epoch 0) deals out: with 2
    processes taking alternate indices, global batch k is permutation[4k:4k + 4]."""
    from torch.utils.data import DistributedSampler

    return list(DistributedSampler(range(N_PAIRS), num_replicas=1, rank=0, shuffle=True, seed=0))


def fit(strategy="auto", *, world: int = 1, dtype=torch.float32, precision: str = "32-true",
        order: list[int] | None = None, save_to: Path | None = None) -> dict:
    L.seed_everything(0, verbose=False)
    model = policy(dtype)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    module = PreferenceModule(model, build("cdpo", beta=0.1), lr=5e-3, weight_decay=0.0, warmup_ratio=0.0)
    records = pairs() if order is None else [pairs()[i] for i in order]
    dm = PairsDataModule(records, pad_id=2, batch_size=GLOBAL_BATCH // world, shuffle=False, with_weights=True,
                         max_length=64, max_prompt_length=32)
    record = _RecordLoss()
    cpu_bf16 = precision == "bf16-mixed" and isinstance(strategy, FSDPStrategy)
    plugins = dict(plugins=[_CPUFSDPPrecision(precision)]) if cpu_bf16 else dict(precision=precision)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, **plugins, max_epochs=EPOCHS,
                        gradient_clip_val=0.05,  # small: clipping acts on every step, so the global norm must be right
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[record])
    trainer.fit(module, datamodule=dm)
    adapter = distributed.trained_adapter_state(trainer)
    optimizer_tensors = len([p for g in trainer.optimizers[0].param_groups for p in g["params"]])
    trainable = sorted(n for n, p in module.model.named_parameters() if p.requires_grad)
    result = {"losses": record.losses, "steps": trainer.global_step, "optimizer_tensors": optimizer_tensors,
              "trainable": trainable}
    if not isinstance(trainer.strategy.model, torch.distributed.fsdp.FullyShardedDataParallel):
        # FSDP leaves each process a shard of every tensor; elsewhere the frozen base must be untouched
        result["frozen_max_change"] = max(float((p.detach() - frozen_before[n]).abs().max())
                                          for n, p in module.model.named_parameters() if not p.requires_grad)
    if adapter is not None:
        if save_to is not None:  # what the pipeline writes (cdpo.pipeline.training._fit)
            save_adapter(module.model, "policy", save_to, state_dict=adapter)
        result["adapter"] = {k: v.float().flatten().tolist() for k, v in adapter.items()}
        result["adapter_dtypes"] = sorted({str(v.dtype) for v in adapter.values()})
    return result


def main(out: str, which: str = "torch") -> None:
    torch.set_num_threads(1)
    save = Path(out).parent
    if which == "deepspeed":  # needs the deepspeed package and DS_ACCELERATOR=cpu
        runs = {"zero2": fit(strategy_for("zero2"), world=2, save_to=save / "zero2")}
    else:
        runs = {"ddp": fit(strategy_for("ddp"), world=2, save_to=save / "ddp"),
                "ddp_no_sync": fit(strategy_for("ddp_no_sync"), world=2),
                "fsdp": fit(strategy_for("fsdp"), world=2, save_to=save / "fsdp"),
                "fsdp_bf16": fit(strategy_for("fsdp"), world=2, dtype=torch.bfloat16, precision="bf16-mixed")}
    if distributed.is_main_process():
        Path(out).write_text(json.dumps(runs))


if __name__ == "__main__":
    main(*sys.argv[1:])
