"""`Trainer` with context parallelism: a mixin on transformers' Trainer (TRL's trainers can take it too).

With `context_parallel_size = c` on c·d processes it trains, evaluates and predicts exactly as the stock Trainer with
`DataCollatorWithFlattening` on d processes (same seed, data and hyper-parameters):

- the model gets the CP attention (`apply_context_parallel`) over a (dp, cp) mesh;
- data are split over the d dp ranks only (`shard_dataloader_over_dp`), for train, eval and test;
- the collator packs each batch into one row and keeps this rank's shard (`ContextParallelCollator`);
- the loss is normalised and scaled as `transformers_cp.loss` explains, and reported equal on every CP rank;
- evaluation and prediction rebuild each row's loss, logits and labels (and the inputs that `include_for_metrics`
  asks for) over the CP group, then gather over dp ranks.

The long-sequence memory savings of the config (chunked LM-head loss, tiled MLP, activation offload: `memory.py`) are
installed with or without CP; the chunked loss serves training and loss-only evaluation, while prediction that needs
logits runs the model's plain head. With `context_parallel_size == 1` and those switches off (or transformers' own
`TrainingArguments`) nothing changes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
import transformers
from transformers.data.data_collator import default_data_collator

from .chunked_loss import chunked_loss_state
from .collator import ContextParallelCollator
from .config import MemorySavings
from .engines import is_deepspeed_engine, scope_checkpoint_loads
from .gathering import gather_over_dp_for_metrics, metrics_over_dp
from .loss import count_label_tokens, loss_scale, reduce_loss_for_logging
from .memory import apply_memory_savings, memory_savings_on, training_callbacks
from .mesh import ContextParallelMesh, build_mesh, settle_gloo_workers_at_exit
from .modeling import apply_context_parallel, context_parallel_mesh
from .sampler import shard_dataloader_over_dp
from .setup_log import describe
from .sharding import gather_sequence
from .training_args import arguments_config

logger = transformers.utils.logging.get_logger(f"transformers.{__name__}")  # shown as the Trainer's own set-up logs


class ContextParallelTrainerMixin:
    """Context parallelism for a `transformers.Trainer` subclass: `class T(ContextParallelTrainerMixin, SFTTrainer)`.

    Reads the `context_parallel_*` fields of `args` (transformers_cp's `TrainingArguments`, or transformers' own with
    the upstream patch); `cp_mesh` is None while it is off.
    """

    cp_mesh: ContextParallelMesh | None = None
    _context_parallel_set_up: bool = False
    # The chunked LM-head loss returns no logits; trainers that score the logits themselves (TRL's) turn it off.
    logits_needed_for_loss: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_context_parallel()

    def _setup_context_parallel(self) -> None:
        """Build the mesh and apply CP to the model, once (a subclass may need it before its own `__init__` ends)."""
        if self._context_parallel_set_up:
            return
        self._context_parallel_set_up = True
        self._warn_fsdp_without_fsdp()
        if dist.is_initialized():
            settle_gloo_workers_at_exit()
        if self.model is not None:
            self._install_memory_savings(self.model)
        config = arguments_config(self.args)
        for callback in training_callbacks(config):
            self.add_callback(callback)
        if config is None:
            return
        if not config.enabled:
            self._log_context_parallel_setup()
            return
        world = dist.get_world_size() if dist.is_initialized() else 1
        if self.accelerator.num_processes != world:
            raise ValueError(
                f"accelerate runs {self.accelerator.num_processes} process(es) but the job has {world}, so gradients "
                "would not be reduced across ranks; on CPU pass use_cpu=True (--use_cpu) to TrainingArguments."
            )
        self._check_context_parallel_trainer()
        # The size against the job's processes (checked here, not in TrainingArguments, so that arguments can be made
        # in a single process), alike on every rank before any group.
        if self.model is None:  # model_init: the model gets CP in `call_model_init`
            self.cp_mesh = build_mesh(config, self.args.device.type)
        else:  # the model checked and the hybrid degree picked for it, alike on every rank before any group
            apply_context_parallel(self.model, config, device_type=self.args.device.type)
            self.cp_mesh = context_parallel_mesh(self.model)
        self._setup_context_parallel_data()
        self._log_context_parallel_setup()

    def _warn_fsdp_without_fsdp(self) -> None:
        """accelerate builds FSDP only for accelerator devices: CPU processes asked for FSDP train with DDP (one
        process: unsharded). A warning, not an error: DDP averages the same gradients over the same processes as FSDP,
        so losses and weights are those FSDP gives (up to reduction order); only each process's memory differs."""
        requested = bool(self.args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if not requested or self.is_fsdp_enabled or self.args.device.type != "cpu" or self.args.process_index != 0:
            return
        engine = "DDP" if self.args.world_size > 1 else "one process, unsharded"
        logger.warning(
            f"fsdp is set, but accelerate runs FSDP only on accelerators and these processes run on CPU: this run "
            f"trains with {engine}. Losses and weights are those FSDP would give (both average the same gradients "
            "over all processes); only memory differs, as every process holds the whole model and optimizer state. "
            "Run on GPUs to shard the model, or leave fsdp unset on CPU."
        )

    def _log_context_parallel_setup(self) -> None:
        """Say once, on the main process, what context parallelism set up (`setup_log.describe`)."""
        if self.args.process_index != 0 or self.model is None:
            return
        savings = self._memory_savings()
        on = memory_savings_on(self.model, savings) if savings is not None else ["none"]
        logger.info("Context parallelism: " + describe(self.model, self.cp_mesh, self.args, on))

    def _memory_savings(self) -> MemorySavings | None:
        """The savings the arguments ask for, with no chunked loss where the trainer needs the logits."""
        config = arguments_config(self.args)
        if config is None:
            return None
        savings = config.memory_savings
        if self.logits_needed_for_loss and savings.loss_chunk_size != 0:
            if savings.loss_chunk_size is not None:
                raise ValueError(
                    f"context_parallel_loss_chunk_size={savings.loss_chunk_size} cannot be used with "
                    f"{type(self).__name__}, which computes its loss and metrics from the logits; leave it unset "
                    "(auto) or set it to 0."
                )
            savings = dataclasses.replace(savings, loss_chunk_size=0)
        return savings

    def _install_memory_savings(self, model: torch.nn.Module) -> None:
        """The arguments' memory savings (`memory.py`)."""
        savings = self._memory_savings()
        if savings is not None:
            apply_memory_savings(model, savings)

    def _check_context_parallel_trainer(self) -> None:
        """Reject trainer settings whose loss a sequence shard cannot compute (before any collective)."""
        if self.compute_loss_func is not None:
            raise ValueError(
                "compute_loss_func is not supported with context_parallel_size > 1: the loss of a sequence shard is "
                "computed by the model from shift_labels; subclass and override compute_loss instead."
            )
        if not self.model_accepts_loss_kwargs:
            raise ValueError(
                f"{type(self.model).__name__}.forward takes no loss kwargs (num_items_in_batch, shift_labels), which "
                "context parallelism needs to compute the loss of a sequence shard; use a transformers causal LM."
            )

    def _setup_context_parallel_data(self) -> None:
        """Batches become this rank's shard of one packed row, and the loss is a token sum over N (see loss.py)."""
        user_collator = None if self.data_collator is default_data_collator else self.data_collator
        self.data_collator = ContextParallelCollator(self.cp_mesh, collator=user_collator)
        self.loss_is_scaled_for_ga = True

    # ---- model -------------------------------------------------------------------------------------------------

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        self._install_memory_savings(model)
        if self.cp_mesh is not None:
            apply_context_parallel(model, mesh=self.cp_mesh)
        return model

    @property
    def model_wrapped(self):
        return self._model_wrapped

    @model_wrapped.setter
    def model_wrapped(self, model) -> None:
        # The Trainer resumes (and loads the best model) through the DeepSpeed engine it stores here: its loads run
        # with DeepSpeed's checkpoint classes allowed under torch.load's weights_only default (see engines.py).
        self._model_wrapped = scope_checkpoint_loads(model) if is_deepspeed_engine(model) else model

    # ---- data --------------------------------------------------------------------------------------------------

    def _get_dataloader(self, *args: Any, **kwargs: Any):
        dataloader = super()._get_dataloader(*args, **kwargs)
        return dataloader if self.cp_mesh is None else shard_dataloader_over_dp(dataloader, self.cp_mesh)

    def get_total_train_batch_size(self, args) -> int:
        total = super().get_total_train_batch_size(args)
        return total if self.cp_mesh is None else total // self.cp_mesh.cp_size

    def _track_num_input_tokens(self, inputs) -> None:
        if self.cp_mesh is None or self.args.include_num_input_tokens_seen == "no":
            return super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen += self._count_row_tokens(inputs)

    def _count_row_tokens(self, inputs) -> int:
        """Real tokens of the packed rows of this step over all dp ranks (CP padding excluded), as the stock run
        counts its rows: one rank per CP group counts its row."""
        tokens = int(inputs["cu_seq_lens_q"][-1]) if self.cp_mesh.cp_rank == 0 else 0
        tokens = torch.tensor(tokens, device=self.args.device, dtype=torch.int64)
        return self.accelerator.gather(tokens).sum().item()

    # ---- loss --------------------------------------------------------------------------------------------------

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        if self.cp_mesh is None:
            return super()._get_num_items_in_batch(batch_samples, device)
        if not batch_samples or "shift_labels" not in batch_samples[0]:
            return None
        labels = [batch["shift_labels"].to(device) for batch in batch_samples]
        return count_label_tokens(labels, self.cp_mesh, across_dp=self.args.average_tokens_across_devices)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.cp_mesh is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if num_items_in_batch is None:
            num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        loss = loss * loss_scale(self.cp_mesh, self.args.average_tokens_across_devices)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        return loss if self.cp_mesh is None else reduce_loss_for_logging(loss, self.cp_mesh)

    # ---- evaluation and prediction -----------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        chunked = chunked_loss_state(self.accelerator.unwrap_model(model))
        if chunked is None:
            return self._prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        chunked.enabled = bool(prediction_loss_only)  # logits are wanted: the model's plain head
        try:
            return self._prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            chunked.enabled = True

    def _prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.cp_mesh is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        num_tokens = int(inputs["cu_seq_lens_q"][-1])
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

        def full_row(tensor: torch.Tensor) -> torch.Tensor:
            return gather_sequence(tensor, self.cp_mesh, dim=1)[:, :num_tokens]

        if loss is not None:
            loss = reduce_loss_for_logging(loss, self.cp_mesh)
        if logits is not None:
            logits = tuple(map(full_row, logits)) if isinstance(logits, (tuple, list)) else full_row(logits)
        if labels is not None:
            labels = full_row(labels)
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if "inputs" in self.args.include_for_metrics and main_input in inputs:
            # The evaluation loop hands compute_metrics what it reads here after this step: the whole row, as the
            # stock run's, in place of this rank's shard.
            inputs[main_input] = full_row(self._prepare_input(inputs[main_input]))
        return loss, logits, labels

    @property
    def gather_function(self):
        """Eval outputs are equal on the CP ranks of a group (see `prediction_step`), so they are gathered over the
        dp ranks only, as `accelerator.gather_for_metrics` gathers them over all processes in the stock run."""
        if self.cp_mesh is None:
            return self._gather_function
        return self._gather_over_dp_for_metrics

    @gather_function.setter
    def gather_function(self, function) -> None:
        self._gather_function = function

    def _metrics_over_dp(self, shard_sums: bool):
        """See `gathering.metrics_over_dp` (TRL's trainers gather their metrics under it)."""
        return metrics_over_dp(self.accelerator, self.cp_mesh, self.args, shard_sums)

    def _gather_over_dp_for_metrics(self, data, use_gather_object: bool = False):
        return gather_over_dp_for_metrics(data, self.cp_mesh, self.accelerator, self.args, use_gather_object)


class Trainer(ContextParallelTrainerMixin, transformers.Trainer):
    """transformers' `Trainer` with context parallelism from `transformers_cp.TrainingArguments`."""
