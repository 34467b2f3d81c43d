"""The model-change registry (`changes.py`): stages run in the declared order whatever the install order, forward
replacements and hooks are undone exactly, dependents go with what they depend on, and CP's removal leaves the model
as it was (TRL's padded rows included)."""

from __future__ import annotations

import pytest
import torch
import transformers

from transformers_cp import changes
from transformers_cp.config import ContextParallelConfig
from transformers_cp.modeling import apply_context_parallel, context_parallel_mesh, remove_context_parallel
from transformers_cp.trl.padded_rows import shard_padded_rows


def _recorder(calls: list, name: str):
    def pre(module, args, kwargs):
        calls.append(f"pre {name}")

    def post(module, args, kwargs, output):
        calls.append(f"post {name}")

    return pre, post


def test_stages_run_in_declared_order_and_are_removed():
    model = torch.nn.Linear(2, 2)
    calls: list[str] = []
    for name in ("router_loss", "recompute", "padded_rows"):  # not the declared order
        pre, post = _recorder(calls, name)
        changes.install(model, name, pre=pre, post=post)
    model(torch.ones(1, 2))
    assert calls == [
        "pre padded_rows",
        "pre recompute",
        "pre router_loss",
        "post router_loss",
        "post recompute",
        "post padded_rows",
    ]
    with pytest.raises(ValueError, match="changes.STAGES"):
        changes.install(model, "undeclared", pre=lambda *a: None)
    for name in ("router_loss", "recompute", "padded_rows"):
        assert changes.remove(model, name)
    assert not model._forward_pre_hooks and not model._forward_hooks and not changes.installed(model, "recompute")


def test_forward_functions_that_always_run_run_when_the_forward_raises():
    model = torch.nn.Linear(2, 2)
    calls: list[str] = []
    pre, post = _recorder(calls, "router_loss")
    changes.install(model, "router_loss", pre=pre, post=post, post_always=True)
    pre, post = _recorder(calls, "chunked_loss")
    changes.install(model, "chunked_loss", pre=pre, post=post)
    with pytest.raises(RuntimeError):
        model(torch.ones(1, 3))  # wrong width: the forward raises
    assert calls == ["pre chunked_loss", "pre router_loss", "post router_loss"]


def test_forward_replacements_hooks_and_dependents_are_undone():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    own = model[1].forward = lambda x: x  # an instance forward someone else set: it comes back
    undone: list[str] = []
    base = changes.install(model, "context_parallel", undo=lambda: undone.append("base"))
    base.replace_forward(model[0], lambda x: x * 0)
    base.replace_forward(model[1], lambda x: x * 0)
    base.track(model[0].register_forward_hook(lambda *a: None))
    changes.install(model, "router_loss", depends_on="context_parallel", undo=lambda: undone.append("dependent"))
    assert changes.remove(model, "context_parallel")
    assert undone == ["dependent", "base"]
    assert "forward" not in vars(model[0]) and model[1].forward is own and not model[0]._forward_hooks
    assert not changes.installed(model, "router_loss") and not hasattr(model, "_transformers_cp_changes")


def test_kept_outputs_watchers_see_keep_and_take():
    model = torch.nn.Linear(2, 2)
    changes.install(model, "offload")
    seen: list = []

    class Watcher:
        def kept(self, key, value):
            seen.append(("kept", key))

        def taking(self, key):
            seen.append(("taking", key))

    store = changes.kept_outputs(model)
    store.watchers.append(Watcher())
    store["a"] = 1
    assert store.pop("a") == 1 and not store
    assert seen == [("kept", "a"), ("taking", "a")]


def test_remove_context_parallel_removes_the_padded_rows_too():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = transformers.LlamaForCausalLM(config)
    apply_context_parallel(model, ContextParallelConfig(size=1))
    shard_padded_rows(model, context_parallel_mesh(model))
    assert changes.installed(model, "padded_rows")
    remove_context_parallel(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not changes.installed(model, "padded_rows") and context_parallel_mesh(model) is None
