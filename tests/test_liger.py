"""`use_liger_kernel=True` beside transformers_cp (docs/liger.md): Liger's kernels need triton and a GPU, so here the
contract its causal-LM forward keeps is checked: the chunked loss, when it takes the labels, also takes the
`skip_logits` that the stock Trainer's evaluation adds for Liger, and the loss stays the model's (float32, rtol 1e-5).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from reference import assert_close
from trainer_cases import build_model, sft_dataset
from transformers import DataCollatorWithFlattening

from transformers_cp.chunked_loss import apply_chunked_loss


def _liger_like(model):
    """Wrap the model's forward as Liger's causal-LM forward behaves: `skip_logits` without labels is an error."""
    forward = model.forward

    def guarded(*args, skip_logits=None, **kwargs):
        if skip_logits and kwargs.get("labels") is None and kwargs.get("shift_labels") is None:
            raise ValueError("skip_logits is True, but labels and shift_labels are None")
        return forward(*args, **kwargs)

    model.forward = guarded
    return model


def test_chunked_loss_takes_skip_logits_with_the_labels():
    batch = DataCollatorWithFlattening(return_tensors="pt")(sft_dataset(3, 4))
    reference = build_model("qwen2", reference=True)
    expected = reference(**batch).loss
    model = _liger_like(apply_chunked_loss(build_model("qwen2", reference=True), chunk_size=8))
    model.eval()
    with torch.no_grad():
        loss = model(**batch, skip_logits=True).loss
    assert_close(loss, expected.detach(), 1e-5, "chunked loss under a Liger-style forward")


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_patches_what_context_parallelism_leaves_alone():
    """Where Liger is installed: its instance patch replaces the forward and the norms, not the attention interface
    that context parallelism registers, nor the lm_head forward the chunked loss installs."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    model = apply_chunked_loss(build_model("qwen2", reference=True), chunk_size=8)
    head_forward = model.get_output_embeddings().forward
    _apply_liger_kernel_to_instance(model=model)
    assert model.get_output_embeddings().forward is head_forward
    assert model.config._attn_implementation == "sdpa"


def test_the_tiled_mlp_wraps_a_forward_set_after_it():
    """Liger binds its SwiGLU forward on each MLP instance when training starts, after the tiled MLP was installed:
    the Trainer's callback tiles that forward again, so both apply; removal gives Liger's forward back."""
    from types import SimpleNamespace

    from transformers_cp.liger import KeepTiledMLPUnderLiger
    from transformers_cp.tiled_mlp import apply_tiled_mlp, remove_tiled_mlp

    model = build_model("qwen2", reference=True)
    apply_tiled_mlp(model, 8)
    calls = []

    def liger_like_forward(self, x):  # the same math, counting its calls and their lengths
        calls.append(x.shape[1])
        return type(self).forward(self, x)

    for layer in model.model.layers:
        layer.mlp.__dict__["forward"] = liger_like_forward.__get__(layer.mlp)  # as Liger's _bind_method_to_module
    batch = DataCollatorWithFlattening(return_tensors="pt")(sft_dataset(2, 4))
    expected = build_model("qwen2", reference=True)(**batch).loss
    args = SimpleNamespace(use_liger_kernel=True)
    KeepTiledMLPUnderLiger(SimpleNamespace(mlp_tile_size=8)).on_train_begin(args, None, None, model=model)
    loss = model(**batch).loss
    assert calls and max(calls) <= 8, calls  # Liger's forward ran, tile by tile
    assert_close(loss, expected, 1e-5, "tiled MLP around a Liger-style forward")
    remove_tiled_mlp(model)
    calls.clear()
    model(**batch)
    assert calls and max(calls) == batch["input_ids"].shape[1]  # Liger's forward is back, untiled
