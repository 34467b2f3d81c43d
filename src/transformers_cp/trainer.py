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

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import transformers
from transformers.data.data_collator import default_data_collator

from .auto_recompute import AutoRecompute
from .chunked_loss import chunked_loss_state
from .collator import ContextParallelCollator
from .engines import is_deepspeed_engine, scope_checkpoint_loads
from .kernels import kernel_class
from .liger import KeepTiledMLPUnderLiger
from .loss import count_label_tokens, loss_scale, reduce_loss_for_logging
from .memory import apply_memory_savings
from .mesh import ContextParallelMesh, build_mesh, job_config, settle_gloo_workers_at_exit
from .model_checks import check_model, model_config
from .model_info import text_config
from .modeling import apply_context_parallel
from .offload import activation_offloader
from .sampler import shard_dataloader_over_dp
from .sharding import gather_sequence
from .tiled_mlp import decoder_mlps
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
        self.add_callback(AutoRecompute(config))
        self.add_callback(KeepTiledMLPUnderLiger(config))
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
        # in a single process) and the hybrid Ulysses degree for this model, alike on every rank before any group.
        config = job_config(config) if self.model is None else model_config(self.model, config)
        if self.model is not None:
            check_model(self.model, config)  # before build_mesh makes the CP groups
        self.cp_mesh = build_mesh(config, self.args.device.type)
        apply_context_parallel(self.model, self.cp_mesh.config, mesh=self.cp_mesh)
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
        """Say once, on the main process, what context parallelism set up: the mode, the c×d layout (and for hybrid
        the Ulysses×ring degrees), the attention kernel that will run and which memory savings are on."""
        if self.args.process_index != 0 or self.model is None:
            return
        model = self.model
        lines = ["off (context_parallel_size=1)"]
        if self.cp_mesh is not None:
            config = self.cp_mesh.config
            layout = f"{config.size} CP ranks × {self.cp_mesh.dp_size} data-parallel"
            if config.combines_ulysses_and_ring:
                layout += f" (Ulysses {config.ulysses_degree} × ring {config.ring_size})"
            text = text_config(model)
            heads = getattr(text, "num_attention_heads", None) or 1
            head_dim = getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // heads
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else model.dtype
            try:
                kernel = kernel_class(config.backend, self.args.device.type == "cuda", dtype, head_dim).name
            except ImportError as error:
                kernel = f"none ({error})"
            lines = [
                f"mode {config.mode} on the {config.layout} layout",
                f"{layout} over {self.args.world_size} processes",
                f"attention kernel '{kernel}' (context_parallel_backend={config.backend}, {dtype}, "
                f"head size {head_dim})",
            ]
        lines.append(f"memory savings: {', '.join(self._memory_savings_on(model))}")
        logger.info("Context parallelism: " + "; ".join(lines))

    def _memory_savings_on(self, model: torch.nn.Module) -> list[str]:
        """Which of the config's memory savings the model got (see `_install_memory_savings`)."""
        config = arguments_config(self.args)
        chunked = chunked_loss_state(model)
        tiled = config.mlp_tile_size != 0 and (config.mlp_tile_size is not None or bool(decoder_mlps(model)))
        offloader = activation_offloader(model)
        on = []
        if chunked is not None:
            size = chunked.chunk_size
            on.append(f"chunked LM-head loss ({f'{size}-token chunks' if size else 'auto: above 2^28 logits'})")
        if tiled:
            size = config.mlp_tile_size
            on.append(f"tiled MLP ({f'{size}-token tiles' if size else 'auto: above 32768 tokens'})")
        if offloader is not None:
            on.append("activation offload" + (" with attention outputs" if config.offload_attention_outputs else ""))
        if config.recompute_layers is not None:
            on.append(f"recomputation of the first {config.recompute_layers} decoder layers only")
        return on or ["none"]

    def _install_memory_savings(self, model: torch.nn.Module) -> None:
        """The config's memory savings (`memory.py`), with no chunked loss where the trainer needs the logits."""
        config = arguments_config(self.args)
        if config is None:
            return
        if self.logits_needed_for_loss and config.loss_chunk_size != 0:
            if config.loss_chunk_size is not None:
                raise ValueError(
                    f"context_parallel_loss_chunk_size={config.loss_chunk_size} cannot be used with "
                    f"{type(self).__name__}, which computes its loss and metrics from the logits; leave it unset "
                    "(auto) or set it to 0."
                )
            config = dataclasses.replace(config, loss_chunk_size=0)
        apply_memory_savings(model, config)

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
            apply_context_parallel(model, self.cp_mesh.config, mesh=self.cp_mesh)
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

    @contextlib.contextmanager
    def _metrics_over_dp(self, shard_sums: bool) -> Iterator[None]:
        """While open, `accelerator.gather` and `gather_for_metrics` give what they give on the dp ranks of a run
        without CP, for code (TRL's metrics) that gathers one value per process. With `shard_sums` each CP rank holds
        its shard's part of a sum, which is summed over the CP group first; otherwise the CP ranks hold equal values.
        """
        from accelerate.utils import recursively_apply

        mesh, accelerator = self.cp_mesh, self.accelerator

        def per_group(data):
            if not shard_sums or mesh.cp_group is None:
                return data

            def reduce(tensor: torch.Tensor) -> torch.Tensor:
                tensor = tensor.detach().clone()
                dist.all_reduce(tensor, group=mesh.cp_group)
                return tensor

            return recursively_apply(reduce, data)

        accelerator.gather = lambda data: self._gather_over_dp(per_group(data))
        accelerator.gather_for_metrics = lambda data, use_gather_object=False: self._gather_over_dp_for_metrics(
            per_group(data), use_gather_object
        )
        try:
            yield
        finally:
            del accelerator.gather, accelerator.gather_for_metrics

    def _gather_over_dp(self, data):
        """`accelerator.gather` over the dp ranks only: tensors (or nests of them) concatenated along dim 0."""
        from accelerate.utils import recursively_apply

        mesh = self.cp_mesh
        if mesh.dp_group is None:
            return data

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor[None] if tensor.dim() == 0 else tensor  # as accelerate gathers scalars
            parts = [torch.empty_like(tensor) for _ in range(mesh.dp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=mesh.dp_group)
            return torch.cat(parts, dim=0)

        return recursively_apply(gather, data)

    def _gather_over_dp_for_metrics(self, data, use_gather_object: bool = False):
        from accelerate.utils import recursively_apply

        mesh = self.cp_mesh
        try:
            recursively_apply(lambda x: x, data, error_on_other_type=True)
        except TypeError:
            use_gather_object = True
        if use_gather_object or self.args.eval_use_gather_object:
            parts = [None] * mesh.dp_size
            if mesh.dp_group is not None:
                dist.all_gather_object(parts, data, group=mesh.dp_group)
            else:
                parts = [data]
            data = [item for part in parts for item in part]
        else:
            data = self._gather_over_dp(data)
        # As accelerate's gather_for_metrics: drop what `even_batches` repeated to fill the last batch.
        state = self.accelerator.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            if isinstance(data, list):
                return data[: state.remainder]
            try:
                return recursively_apply(lambda tensor: tensor[: state.remainder], data)
            except IndexError:  # a scalar (one process): returned as is, as accelerate does
                return data
        return data


class Trainer(ContextParallelTrainerMixin, transformers.Trainer):
    """transformers' `Trainer` with context parallelism from `transformers_cp.TrainingArguments`."""
