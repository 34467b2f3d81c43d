"""The MoE router load-balancing (auxiliary) loss of a whole packed row, under context parallelism.

transformers' MoE causal LMs add `coef · A` to their loss, with A from the module-level `load_balancing_loss_func` of
their modeling file (the Switch Transformer loss): over the router logits of every layer and every (unpadded) token,

    A = E · Σ_e (n_e / T) · (p_e / T),

where n_e counts the tokens routed to expert e (top-k), p_e sums the softmax probability of e, and T counts the
(layer, token) pairs. The three sums are sums over tokens, so the row's A_g is exact from each CP rank's sums over its
own shard, summed over the CP group: rank r computes its sums (the CP padding tail, global indices at or past the
row's `cu_seq_lens_q[-1]`, left out, as stock `DataCollatorWithFlattening` rows have no padding), all-reduces them with
a backward that is the identity, and gets A_g, whose gradient reaches the router only through rank r's tokens: ∇_r A_g,
with Σ_{r∈g} ∇_r A_g = ∇A_g.

How rank r's term is scaled (`loss.py`'s notation: the stock rank's loss L_g = k·(S_g/N + coef·A_g), rank r
back-propagates ℓ_r = c·k·(S_r/N + coef·X_r), logs Σ_{r∈g} ℓ_r / c, and DDP averages over c·d ranks):

- token-sum losses (the Trainer, a custom loop, the chunked loss): X_r = A_g − (1 − 1/c)·A_g.detach(), whose value is
  A_g / c and whose gradient is ∇_r A_g. Then Σ_{r∈g} X_r = A_g (the logged and evaluated loss is the stock one), and
  grad = 1/(c·d) Σ_g Σ_{r∈g} c·k·coef·∇_r A_g = (1/d) Σ_g k·coef·∇A_g, the stock gradient. X_r is what the model
  returns as `aux_loss` and adds to its loss, so it stands beside S_r/N exactly as a shard's share of the row.
- replicated whole-row losses (DPO, `transformers_cp.trl`): every rank computes the same L_g = ... + coef·A_g and
  back-propagates c·L_g through its own tokens (`loss.py`): X_r = A_g, the value and gradient above
  (`replicate_router_loss`).

The model's own function stays in place and is used whenever no CP model is in its forward: the replacement is a
dispatcher that takes the CP form only while a CP model's forward runs (set by its pre-forward stage). It is installed
in the modeling modules of the model's classes, and in Mixtral's, whose function TRL's fused LM head calls for every
MoE family. A model family
whose function computes something else (its result on a probe differs from the formula above, e.g. Doge's
product-key experts) is refused before training when its coefficient is non-zero and it outputs router logits.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import changes
from .mesh import ContextParallelMesh
from .model_info import text_config

FUNCTION_NAME = "load_balancing_loss_func"
_COEF_NAMES = ("router_aux_loss_coef", "aux_loss_coef")
NAME = "router_loss"
_ORIGINAL_ATTR = "_context_parallel_original"


@dataclass
class RouterLossState:
    """Per model: how its aux term is scaled, and the row of the forward in flight."""

    mesh: ContextParallelMesh
    replicated: bool = False  # X_r = A_g (whole-row losses) instead of a shard's share A_g / c
    tokens: list = field(default_factory=list)  # context-variable tokens of the forwards in flight (nested: LIFO)


@dataclass(frozen=True)
class _Row:
    mesh: ContextParallelMesh
    real: torch.Tensor | None  # this rank's tokens that are not CP padding (1.0 / 0.0), None: all of them
    replicated: bool


_active: ContextVar[_Row | None] = ContextVar("context_parallel_router_row", default=None)


def _routing_sums(
    gate_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, weight: torch.Tensor | None
) -> torch.Tensor:
    """[n_e (E), p_e (E), T] of the formula, in float32, summed over the layers' tokens weighted by `weight`."""
    device = gate_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros(1, dtype=torch.float32, device=device)
    for logits in gate_logits:
        routing = torch.softmax(logits.to(device), dim=-1)
        _, chosen = torch.topk(routing, top_k, dim=-1)
        w = torch.ones(routing.shape[0], dtype=torch.float32, device=device) if weight is None else weight
        counts = counts.scatter_add(0, chosen.reshape(-1), w.repeat_interleave(top_k))
        probs = probs + (routing.float() * w[:, None]).sum(dim=0)
        rows = rows + w.sum()
    return torch.cat([counts, probs, rows])


def _combine(sums: torch.Tensor, num_experts: int) -> torch.Tensor:
    counts, probs, rows = sums[:num_experts], sums[num_experts : 2 * num_experts], sums[-1]
    return num_experts * torch.sum((counts / rows) * (probs / rows))


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the identity: the gradient stays on this rank's own contribution."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = tensor.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def row_load_balancing_loss(
    gate_logits: tuple[torch.Tensor, ...] | torch.Tensor | None,
    num_experts: int | None = None,
    top_k: int = 2,
    attention_mask: torch.Tensor | None = None,
    *,
    row: _Row,
) -> torch.Tensor | int:
    """X_r of the module docstring for this rank's router logits (same arguments as transformers' function)."""
    if gate_logits is None or not isinstance(gate_logits, tuple):
        return 0
    weight = row.real
    if attention_mask is not None:  # not passed under CP (the pre-forward hook drops an all-ones mask); honoured
        mask = attention_mask.reshape(-1).to(gate_logits[0].device, torch.float32)
        weight = mask if weight is None else weight * mask
    sums = _routing_sums(gate_logits, num_experts, top_k, weight)
    if row.mesh.cp_group is not None:
        sums = _SumOverGroup.apply(sums, row.mesh.cp_group)
    loss = _combine(sums, num_experts)
    if row.replicated:
        return loss
    return loss - (1 - 1 / row.mesh.cp_size) * loss.detach()


def _dispatcher(original):
    def load_balancing_loss_func(*args, **kwargs):
        row = _active.get()
        if row is None:
            return original(*args, **kwargs)
        return row_load_balancing_loss(*args, row=row, **kwargs)

    setattr(load_balancing_loss_func, _ORIGINAL_ATTR, original)
    load_balancing_loss_func.__doc__ = original.__doc__
    return load_balancing_loss_func


def _modules_of(model: torch.nn.Module) -> list:
    """The modeling modules that define a `load_balancing_loss_func`, over the class hierarchies of the model and its
    submodules (a wrapper such as a PEFT model holds the causal LM whose forward calls it)."""
    modules = []
    for cls in dict.fromkeys(c for m in model.modules() for c in type(m).__mro__):
        module = sys.modules.get(cls.__module__)
        if module is not None and hasattr(module, FUNCTION_NAME) and module not in modules:
            modules.append(module)
    return modules


def _original(module) -> object:
    function = getattr(module, FUNCTION_NAME)
    return getattr(function, _ORIGINAL_ATTR, function)


def is_standard(function) -> bool:
    """Whether `function(gate_logits, num_experts, top_k, attention_mask)` computes the formula of the module docstring,
    probed on small random logits with and without a padding mask."""
    g = torch.Generator().manual_seed(0)
    experts, top_k = 5, 2
    logits = tuple(torch.randn(6, experts, generator=g) for _ in range(2))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    try:
        for m in (None, mask):
            want = _combine(
                _routing_sums(logits, experts, top_k, None if m is None else m.reshape(-1).float()), experts
            )
            got = function(logits, experts, top_k, m)
            if not torch.is_tensor(got) or not torch.allclose(got.float(), want, rtol=1e-5, atol=0.0):
                return False
    except Exception:  # a different signature or shape contract: not this formula
        return False
    return True


def aux_loss_coefficient(model: torch.nn.Module) -> float:
    """The coefficient the model's forward multiplies its `aux_loss` by (0.0 where it has none)."""
    for source in (model, text_config(model), model.config):
        for name in _COEF_NAMES:
            value = getattr(source, name, None)
            if isinstance(value, (int, float)):
                return float(value)
    return 0.0


def check_router_loss(model: torch.nn.Module, coef: float | None = None, enabled: bool | None = None) -> None:
    """Refuse a model whose router aux loss is on (`coef`, `enabled`: the model's own settings unless given) and is
    not the standard formula, which CP computes exactly over sequence shards. Talks to no other rank."""
    coef = aux_loss_coefficient(model) if coef is None else coef
    enabled = bool(getattr(text_config(model), "output_router_logits", False)) if enabled is None else enabled
    if not coef or not enabled:
        return
    for module in _modules_of(model):
        if not is_standard(_original(module)):
            raise ValueError(
                f"context parallelism does not support the MoE router auxiliary loss of {type(model).__name__}: its "
                f"{module.__name__}.{FUNCTION_NAME} is not the Switch-Transformer load-balancing loss over per-expert "
                "token counts and router probabilities that can be summed over sequence shards, so each rank would "
                "compute it on its shard alone; set router_aux_loss_coef=0.0 (or output_router_logits=False)."
            )


def install_router_loss(model: torch.nn.Module, mesh: ContextParallelMesh) -> None:
    """Make the model's aux loss the whole row's while it runs under CP (removed with CP's change; the modules'
    dispatchers stay: they call the model family's own function whenever no CP model is in its forward). Models
    without a `load_balancing_loss_func` get nothing."""
    modules = _modules_of(model)
    if not modules:
        return
    # TRL's fused LM head (SFT, DPO) computes every MoE family's aux loss with Mixtral's function.
    from transformers.models.mixtral import modeling_mixtral

    for module in dict.fromkeys([*modules, modeling_mixtral]):
        if not hasattr(getattr(module, FUNCTION_NAME), _ORIGINAL_ATTR):
            setattr(module, FUNCTION_NAME, _dispatcher(getattr(module, FUNCTION_NAME)))
    state = RouterLossState(mesh)

    def begin(module, args, kwargs):
        inputs = kwargs.get("input_ids", args[0] if args else None)
        inputs = inputs if inputs is not None else kwargs.get("inputs_embeds")
        real = None
        cu = kwargs.get("cu_seq_lens_q")
        if inputs is not None and cu is not None and mesh.cp_group is not None:
            seq_len = inputs.shape[1] * mesh.cp_size
            tokens = int(cu[-1])
            if tokens < seq_len:
                index = mesh.current_layout.index(seq_len, mesh.cp_rank, device=inputs.device)
                real = (index < tokens).float()
        state.tokens.append(_active.set(_Row(mesh, real, state.replicated)))

    def end(module, args, kwargs, output):
        if state.tokens:
            _active.reset(state.tokens.pop())

    changes.install(model, NAME, state=state, pre=begin, post=end, post_always=True, depends_on="context_parallel")


def replicate_router_loss(model: torch.nn.Module, replicated: bool = True) -> None:
    """Make the CP model's aux loss the whole row's A_g on every rank (for losses computed alike on every CP rank from
    gathered full sequences, such as DPO's), instead of the shard's share A_g / c."""
    state = changes.state(model, NAME)
    if state is not None:
        state.replicated = replicated
