"""Shared pieces of the engine tests: one Trainer run under DDP, FSDP2 or DeepSpeed ZeRO on CPU, and its record.

DeepSpeed runs on CPU as it is (its CPU accelerator, gloo). accelerate turns FSDP on only for accelerator devices:
on CPU its distributed type stays MULTI_CPU (DDP) whatever the plugin says. `EngineOnCpu` sets, right after the
accelerator is built, the state that accelerate sets on GPU (distributed type FSDP and the plugin); accelerate's
`prepare`, the Trainer's save/resume paths and `fully_shard` then run unchanged, over gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from trainer_cases import CPTrainer, arguments, build_model, sft_dataset
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import transformers_cp


def deepspeed_config(stage: int, offload: bool = False) -> dict:
    zero: dict = {"stage": stage}
    if offload:
        zero.update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # model.safetensors in each checkpoint
    return {
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # offload with the Trainer's torch optimizer (no compiled CPU Adam)
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }


# SGD with momentum: exact like plain SGD, and the optimizer has a state that a resumed run must restore.
OPTIM_ARGS = "momentum=0.9"

ENGINES = {
    "ddp": {},
    "fsdp2": {"fsdp": True, "fsdp_config": {"version": 2}},
    "zero1": {"deepspeed": deepspeed_config(1)},
    "zero2": {"deepspeed": deepspeed_config(2)},
    "zero3_offload": {"deepspeed": deepspeed_config(3, offload=True)},
}


# What the Trainer's `model_wrapped` must be, so that a silent fall-back to another engine fails the test.
WRAPPERS = {"ddp": "DistributedDataParallel", "fsdp2": "FSDP", "zero": "DeepSpeedEngine"}


class EngineOnCpu:
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None:
            # As accelerate does at the end of `AcceleratorState.__init__`, on both shared states: every later
            # `AcceleratorState()` copies PartialState's.
            AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True


class EngineTrainer(EngineOnCpu, CPTrainer):
    step_losses: list


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """Every parameter in full, on every rank: FSDP2 shards are DTensors, ZeRO-3 partitions are gathered."""
    model = trainer.model
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {name: p.detach().clone() for name, p in model.named_parameters()}
    weights = {}
    for name, p in model.named_parameters():
        weights[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return weights


def run_engine(engine: str, cp: int, output_dir: str, resume: str | None = None, **kwargs) -> dict:
    """Train `llama` on the SFT set under `engine` with `context_parallel_size=cp`; record losses and weights.

    The model is built before the arguments, so ZeRO-3 partitions the seeded model in `deepspeed.initialize` rather
    than initialising it inside `zero.Init` (whose per-partition init draws other random numbers); an earlier run's
    ZeRO-3 config, still registered with transformers, is dropped first for the same reason.
    """
    unset_hf_deepspeed_config()
    model = build_model("llama", reference=cp == 1)
    args = transformers_cp.TrainingArguments(
        **arguments(output_dir, context_parallel_size=cp, optim_args=OPTIM_ARGS, **ENGINES[engine], **kwargs)
    )
    trainer = EngineTrainer(model=model, args=args, train_dataset=sft_dataset(13, 0), eval_dataset=sft_dataset(7, 1))
    trainer.step_losses = []
    trainer.train(resume_from_checkpoint=resume)
    wrapper = WRAPPERS[engine[:4] if engine.startswith("zero") else engine]
    assert type(trainer.model_wrapped).__name__.startswith(wrapper), (engine, type(trainer.model_wrapped))
    history = trainer.state.log_history
    return {
        "losses": {h["step"]: h["loss"] for h in history if "loss" in h},
        "grad_norms": {h["step"]: h["grad_norm"] for h in history if "grad_norm" in h},
        "eval_loss": trainer.evaluate()["eval_loss"],
        "weights": full_weights(trainer),
        "groups": {name: group_ranks(getattr(trainer.cp_mesh, f"{name}_group", None)) for name in ("cp", "dp")},
    }


def group_ranks(group) -> list[int] | None:
    return None if group is None else sorted(dist.get_process_group_ranks(group))


def stock_record(result: dict) -> dict:
    """`trainer_cases.run_stock`'s record in `run_engine`'s form (steps numbered from 1)."""
    steps = range(1, len(result["losses"]) + 1)
    return {
        "losses": dict(zip(steps, result["losses"])),
        "grad_norms": dict(zip(steps, result["grad_norms"])),
        "eval_loss": result["eval_loss"],
        "weights": result["weights"],
    }
