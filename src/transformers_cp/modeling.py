"""Installing context parallelism on a Hugging Face model: `apply_context_parallel` / `remove_context_parallel`.

The model's attention is switched to the registered implementation `"context_parallel"` (`adapter.py`), whatever it
was loaded with, so no flash-attn is needed. The CP settings live on the model's modules (`state.py`), and the model
gets its own copy of its config (transformers reads the attention implementation from the config, which models made
from one config object share), so two models in one process keep their own. CP's pre-forward stage (`changes.py`)
checks the batch on every rank (`batch_checks.py`) and turns its document boundaries into a `Documents` object once
per forward (every layer reuses it). Everything is installed as the `"context_parallel"` change of the model (and the
router-loss change that depends on it), so `remove_context_parallel` undoes exactly that.
"""

from __future__ import annotations

import copy

import torch
import transformers

from . import changes, forward_documents, mixers, odysseus
from .adapter import register
from .batch_checks import check_batch, documents_from_position_ids
from .config import ContextParallelConfig
from .mesh import ContextParallelMesh, build_mesh, init_distributed
from .model_checks import check_model, model_config
from .model_info import max_positions
from .plan import Documents
from .recompute import checkpointable_layers
from .rope import follow_row_positions
from .router_loss import install_router_loss
from .sharding import BATCH_PROBLEM, ROW_CHECKSUM
from .state import ATTENTION_NAME, STATE_ATTR, ContextParallelState, find_state

NAME = "context_parallel"


def _pre_forward_stage(state: ContextParallelState):
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
            docs.position_ids = kwargs["position_ids"]
            kwargs["cp_documents"] = docs
        forward_documents.begin(kwargs["cp_documents"])  # for models that do not hand keyword arguments to attention
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
    *,
    device_type: str | None = None,
) -> torch.nn.Module:
    """Make `model`'s attention context parallel. Idempotent; undone by `remove_context_parallel`.

    Give a config, and the model is checked and the mesh built for it (on `device_type`; default: CUDA when
    available), or a mesh built for it (`build_mesh`), whose config is then the one; both only when they agree. With
    neither, the CP group is every rank of the job, in the default mode. The model must then be called with this
    rank's shard of one packed row and its global position_ids (see `shard_batch`).
    """
    if mesh is not None and config not in (None, mesh.config):
        raise ValueError(
            "apply_context_parallel got a config and a mesh built for another config; pass the mesh alone (its "
            "config is `mesh.config`) or the config alone."
        )
    config = mesh.config if mesh is not None else config or ContextParallelConfig()
    existing = find_state(model)
    if existing is not None:
        if mesh in (None, existing.mesh) and existing.requested == config:
            return model
        remove_context_parallel(model)
    if mesh is None:
        init_distributed(device_type)
        resolved = model_config(model, config)
        check_model(model, resolved)  # before build_mesh makes the CP groups
        mesh = build_mesh(resolved, device_type)
    else:
        check_model(model, mesh.config)
    register()
    state = ContextParallelState(mesh, config, max_positions=max_positions(model))
    state.layers = checkpointable_layers(model)
    state.layer_of = {module: layer for layer in state.layers for module in layer.modules()}

    def undo() -> None:
        for module in model.modules():
            if getattr(module, STATE_ATTR, None) is state:
                delattr(module, STATE_ATTR)
        for module, name, original in state.original_configs:
            setattr(module, name, original)

    change = changes.install(
        model,
        NAME,
        state=state,
        pre=_pre_forward_stage(state),
        post=lambda module, args, kwargs, output: forward_documents.end(),  # current for exactly one forward
        post_always=True,
        undo=undo,
    )
    state.kept = changes.kept_outputs(model)  # shared with a feature that moves them (activation offload)
    for module in model.modules():
        setattr(module, STATE_ATTR, state)  # the attention function finds its settings on its module
    state.original_configs = _own_config(model)  # so that other models of the same config keep their attention
    model.set_attn_implementation(ATTENTION_NAME)
    if mesh.config.whole_rows and mesh.cp_group is not None:
        state.rotary = odysseus.install(model, mesh, change)
    mixers.install(model, mesh)  # recurrent / conv mixers, exact; their stage follows CP's
    for handle in follow_row_positions(model, lambda: state.row_max_position):
        change.track(handle)
    install_router_loss(model, mesh)
    return model


def remove_context_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_context_parallel`: its stage, hooks and forward replacements go, and the model's modules get back
    the config objects (so the attention implementation) they held before."""
    if find_state(model) is None:
        return model
    changes.remove(model, NAME)  # with what depends on it (the router loss, TRL's padded rows)
    return model


def context_parallel_mesh(model: torch.nn.Module) -> ContextParallelMesh | None:
    """The mesh CP was applied with, or None."""
    state = find_state(model)
    return None if state is None else state.mesh


__all__ = ["ATTENTION_NAME", "apply_context_parallel", "remove_context_parallel", "context_parallel_mesh"]
