"""Installing context parallelism on a Hugging Face model: `apply_context_parallel` / `remove_context_parallel`.

The model's attention is switched to the registered implementation `"context_parallel"` (`adapter.py`), whatever it
was loaded with, so no flash-attn is needed. The CP settings live on the model's modules (`state.py`), and the model
gets its own copy of its config (transformers reads the attention implementation from the config, which models made
from one config object share), so two models in one process keep their own. A forward pre-hook checks the batch on
every rank (`batch_checks.py`) and turns its document boundaries into a `Documents` object once per forward (every
layer reuses it).
"""

from __future__ import annotations

import copy

import torch
import transformers

from . import odysseus
from .adapter import register
from .batch_checks import check_batch, documents_from_position_ids
from .config import ContextParallelConfig
from .mesh import ContextParallelMesh, build_mesh, init_distributed
from .model_checks import check_model, model_config
from .model_info import max_positions
from .plan import Documents
from .recompute import checkpointable_layers
from .rope import follow_row_positions
from .router_loss import install_router_loss, remove_router_loss
from .sharding import BATCH_PROBLEM, ROW_CHECKSUM
from .state import ATTENTION_NAME, STATE_ATTR, ContextParallelState, find_state


def _pre_forward_hook(state: ContextParallelState):
    mesh = state.mesh

    def hook(module, args, kwargs):
        state.new_forward()
        checksum, marked = kwargs.pop(ROW_CHECKSUM, None), kwargs.pop(BATCH_PROBLEM, None)  # not for the model
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if inputs is None:
            return args, kwargs
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None and mesh.layout.balance == "documents" and "cp_documents" not in kwargs:
            raise ValueError(
                "context_parallel_balance='documents' shards each row by its documents, so the model needs the row's "
                "cu_seq_lens_q (the transformers_cp collator and shard_batch pass it); pass it with the shard."
            )
        bounds = [] if cu is None else [int(b) for b in cu.tolist()]  # read from the device once per forward
        # before any collective, decided alike on every rank
        state.row_max_position = check_batch(module, state, inputs, kwargs, bounds, checksum, marked)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = None  # all ones (checked): packed rows need none
        if "cp_documents" not in kwargs:
            if cu is not None:
                docs = Documents(bounds, inputs.shape[1] * mesh.cp_size)
            else:
                docs = documents_from_position_ids(kwargs["position_ids"], mesh)
            kwargs["cp_documents"] = docs
        mesh.row_layout = kwargs["cp_documents"].layout(mesh.layout)  # how this row was sharded
        kwargs["use_cache"] = False
        return args, kwargs

    return hook


def _own_config(model: torch.nn.Module) -> list:
    """Give `model` a copy of its config, held by every module that held the config or one of its sub-configs (the
    attention modules keep `self.config`); returns (module, attribute, original) to put back on removal."""
    copies: dict = {}
    copy.deepcopy(model.config, copies)  # `copies` maps id(original) -> copy for the config and all it holds
    originals = [
        (module, name, value)
        for module in model.modules()
        for name, value in vars(module).items()
        if isinstance(value, transformers.PretrainedConfig) and id(value) in copies
    ]
    for module, name, value in originals:
        setattr(module, name, copies[id(value)])
    return originals


def apply_context_parallel(
    model: torch.nn.Module,
    config: ContextParallelConfig | None = None,
    mesh: ContextParallelMesh | None = None,
) -> torch.nn.Module:
    """Make `model`'s attention context parallel. Idempotent; undone by `remove_context_parallel`.

    With no config the CP group is every rank of the job, in the default mode. The model must then be called with
    this rank's shard of one packed row and its global position_ids (see `shard_batch`).
    """
    config = config or ContextParallelConfig()
    existing = find_state(model)
    if existing is not None:
        if mesh in (None, existing.mesh) and existing.requested == config:
            return model
        remove_context_parallel(model)
    if mesh is None:
        init_distributed()
        resolved = model_config(model, config)
        check_model(model, resolved)  # before build_mesh makes the CP groups
        mesh = build_mesh(resolved)
    else:
        check_model(model, mesh.config)
    register()
    state = ContextParallelState(mesh, config, max_positions=max_positions(model))
    state.layers = checkpointable_layers(model)
    state.layer_of = {module: layer for layer in state.layers for module in layer.modules()}
    for module in model.modules():
        setattr(module, STATE_ATTR, state)
    state.original_configs = _own_config(model)  # so that other models of the same config keep their attention
    model.set_attn_implementation(ATTENTION_NAME)
    if mesh.config.whole_rows and mesh.cp_group is not None:
        state.rotary = odysseus.install(model, mesh)
    state.hooks.append(model.register_forward_pre_hook(_pre_forward_hook(state), with_kwargs=True))
    state.hooks.extend(follow_row_positions(model, lambda: state.row_max_position))
    state.hooks.extend(install_router_loss(model, mesh))  # after the hook above: the row's MoE aux loss
    return model


def remove_context_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation the model had before `apply_context_parallel`, by giving its modules back
    the config objects they held then."""
    state = find_state(model)
    if state is None:
        return model
    for hook in state.hooks:
        hook.remove()
    odysseus.uninstall(model)
    remove_router_loss(model)
    for module in model.modules():
        if getattr(module, STATE_ATTR, None) is state:
            delattr(module, STATE_ATTR)
    for module, name, original in state.original_configs:
        setattr(module, name, original)
    return model


def context_parallel_mesh(model: torch.nn.Module) -> ContextParallelMesh | None:
    """The mesh CP was applied with, or None."""
    state = find_state(model)
    return None if state is None else state.mesh


__all__ = ["ATTENTION_NAME", "apply_context_parallel", "remove_context_parallel", "context_parallel_mesh"]
