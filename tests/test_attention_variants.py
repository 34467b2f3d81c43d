"""Attention variants under CP: sinks (gpt-oss, Granite-SWA, Flint, MiMo-V2-Flash), logit softcapping (Gemma 2),
chunked attention (Llama 4) and Nemotron (whose decoder layers do not hand keyword arguments to attention).

The kernels' softcap and the sink rescale against dense softmax (values and gradients); each family under CP in every
mode its heads allow, against each document run alone (logits and every gradient, float32); and training under
`transformers_cp.Trainer` against the stock Trainer with `DataCollatorWithFlattening`.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist
import transformers
from distributed import run_distributed
from reference import assert_close, document_ids, per_document
from trainer_cases import (
    RTOL,
    VOCAB,
    CPTrainer,
    StockTrainer,
    arguments,
    assert_same_run,
    sft_dataset,
    train_and_record,
)

import transformers_cp
from transformers_cp import ContextParallelConfig, apply_context_parallel, build_mesh, forward_documents
from transformers_cp.algorithms.local import LocalAttention
from transformers_cp.algorithms.merge import Accumulator
from transformers_cp.kernels import Segments, flex
from transformers_cp.kernels.math import MathKernel

COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, attention_dropout=0.0, pad_token_id=0,
    bos_token_id=1, eos_token_id=2,
)  # fmt: skip
FAMILIES = {
    # sinks, a sliding and a full layer, MoE
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
                    layer_types=["sliding_attention", "full_attention"]),
    # softcap: query_pre_attn_scalar=1 makes the scores large enough that the cap bends them
    "gemma2": dict(attn_logit_softcapping=2.0, query_pre_attn_scalar=1, sliding_window=6,
                   layer_types=["sliding_attention", "full_attention"]),
    # chunks of 8 cut the documents of 22 and 11 tokens; the full layer keeps them whole
    "llama4_text": dict(attention_chunk_size=8, layer_types=["chunked_attention", "full_attention"],
                        no_rope_layers=[1, 1], num_local_experts=2, intermediate_size_mlp=48),
    "granite_swa": dict(sliding_window=6),
    "granitemoe_swa": dict(sliding_window=6, num_local_experts=2, num_experts_per_tok=1),
    "flint": dict(sliding_window=6, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16),
    # values as wide as queries and keys: odysseus splits v_proj by head_dim
    "mimo_v2_flash": dict(sliding_window=6, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                          v_head_dim=8),
    "nemotron": dict(),
}  # fmt: skip
DOCS = [5, 1, 22, 11, 9]
MODES = ("zigzag", "llama3", "ulysses", "odysseus")


def build(family: str, reference: bool = True, attn: str = "eager") -> transformers.PreTrainedModel:
    """The family's tiny model, seed 0, its sinks drawn away from their initial values so that they matter."""
    config = transformers.CONFIG_MAPPING[family](**COMMON, **FAMILIES[family])
    if reference:
        config.use_cache = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("sinks"):
                param.normal_(0.0, 1.0)
    return model


# --- the kernels -------------------------------------------------------------------------------------------------


def dense_attention(q, k, v, lengths, scale, softcap=None, sinks=None, window=None):
    """Causal attention within documents by dense softmax, with a logit softcap and sinks: the reference."""
    hq, hk = q.shape[1], k.shape[1]
    doc = document_ids(lengths)
    i, j = torch.arange(q.shape[0])[:, None], torch.arange(q.shape[0])[None, :]
    visible = (doc[:, None] == doc[None, :]) & (j <= i)
    if window is not None:
        visible &= j > i - window
    kr, vr = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kr) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks[:, None, None].expand(-1, q.shape[0], 1)], dim=-1)
    probs = scores.softmax(-1)[..., : q.shape[0]]
    return torch.einsum("hqk,khd->qhd", probs, vr)


def _inputs(length: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(length, h, 8, generator=g) for h in (4, 2, 2))
    return q, k, v, torch.randn(length, 4, 8, generator=g)


def _grads(out, dout, *inputs):
    return torch.autograd.grad(out, inputs, dout)


def test_sinks_rescale_values_and_gradients():
    """LocalAttention with sinks (the merged (out, lse) rescaled, the standard backward on the rescaled pair, the
    sinks' own gradient) equals dense softmax with a sink column, in every gradient."""
    q, k, v, dout = _inputs()
    sinks = torch.randn(4)
    cu = tuple(torch.tensor([0, *DOCS]).cumsum(0).tolist())
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = LocalAttention.apply(*leaves[:3], Segments(cu, cu, True), MathKernel(), 0.3, None, leaves[3])
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, sinks)]
    ref = dense_attention(*ref_leaves[:3], DOCS, 0.3, sinks=ref_leaves[3])
    assert_close(out.double(), ref, RTOL, "sink output")
    expected = _grads(ref, dout.double(), *ref_leaves)
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), _grads(out, dout, *leaves), expected):
        assert_close(got.double(), want, RTOL, name)


def _merged_blocks(kernel, q, k, v, split: int, scale: float, dout):
    """One document of keys [0, split) and [split, T) as two blocks (a ring's earlier block and its diagonal),
    merged through the lse; each block's backward takes the merged (out, lse), as ring attention does."""
    length = q.shape[0]
    rows = length - split
    blocks = [
        (slice(0, split), Segments((0, rows), (0, split), causal=False)),
        (slice(split, length), Segments((0, rows), (0, rows), causal=True)),
    ]
    qs = q[split:]
    acc = Accumulator(qs)
    for keys, seg in blocks:
        out, lse = kernel.forward(qs, k[keys], v[keys], seg, scale)
        acc.add((0, rows), out, lse)
    dq, dk, dv = torch.zeros_like(qs), torch.zeros_like(k), torch.zeros_like(v)
    for keys, seg in blocks:
        g = kernel.backward(dout[split:], qs, k[keys], v[keys], acc.out.to(q.dtype), acc.lse, seg, scale)
        dq += g[0]
        dk[keys] += g[1]
        dv[keys] += g[2]
    return acc.out, dq, dk, dv


def _dense_rows(q, k, v, dout, split: int, scale: float, softcap: float):
    """The dense reference of the last `T - split` query rows of one document."""
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = dense_attention(*leaves, [q.shape[0]], scale, softcap=softcap)[split:]
    dq, dk, dv = torch.autograd.grad(out, leaves, dout[split:].double())
    return out, dq[split:], dk, dv


@pytest.mark.parametrize("softcap", [None, 0.7])
def test_math_kernel_softcap_merged_blocks(softcap):
    """The exact kernel with and without a softcap, over blocks merged as the ring merges them: values and grads."""
    q, k, v, dout = _inputs(40, seed=1)
    got = _merged_blocks(MathKernel(softcap), q, k, v, 24, 0.9, dout)
    want = _dense_rows(q, k, v, dout, 24, 0.9, softcap)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a.double(), b, RTOL, f"softcap={softcap} {name}")


def test_flex_kernel_backward_takes_the_merged_softmax(monkeypatch):
    """FlexKernel's backward turns its block's own softmax gradient into the merged one (see `kernels.flex`). CPU
    FlexAttention has no backward, so its call is replaced by dense autograd attention of the same mask and score_mod:
    what is checked is the kernel's mapping of gradients, against the dense reference."""

    def dense_flex(q, k, v, score_mod, block_mask, scale, enable_gqa, kernel_options, **kw):
        group = q.shape[1] // k.shape[1]
        q, k, v = q[0], k[0].repeat_interleave(group, 0), v[0].repeat_interleave(group, 0)
        i, j = torch.arange(q.shape[1])[:, None], torch.arange(k.shape[1])[None, :]
        scores = torch.einsum("hqd,hkd->hqk", q, k) * scale
        scores = score_mod(scores, 0, 0, i, j).masked_fill(~block_mask.mask_mod(0, 0, i, j), float("-inf"))
        lse = torch.logsumexp(scores, -1)
        out = torch.einsum("hqk,hkd->hqd", torch.exp(scores - lse[..., None]), v)
        return out[None], lse[None]

    monkeypatch.setattr(flex, "_flex", lambda: dense_flex)
    monkeypatch.setattr(flex, "_lse_kwargs", dict)
    q, k, v, dout = _inputs(40, seed=2)
    got = _merged_blocks(flex.FlexKernel(0.7), q, k, v, 24, 0.9, dout)
    want = _dense_rows(q, k, v, dout, 24, 0.9, 0.7)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a.double(), b, RTOL, f"flex {name}")


def test_flex_kernel_forward_on_cpu():
    """FlexAttention itself (forward; CPU has no FlexAttention backward) with the softcap score_mod and the segments'
    block mask: documents causally, and a ring's earlier block (non-causal, bottom-right aligned, windowed)."""
    q, k, v, _ = (t.float() for t in _inputs(48, seed=3))
    cu = tuple(torch.tensor([0, *DOCS]).cumsum(0).tolist())
    for seg in (Segments(cu, cu, True), Segments((0, 20), (0, 30), causal=False, window_left=25)):
        rows, keys = seg.cu_q[-1], seg.cu_k[-1]
        out, lse = flex.FlexKernel(0.7).forward(q[:rows], k[:keys], v[:keys], seg, 0.9)
        ref_out, ref_lse = MathKernel(0.7).forward(q[:rows], k[:keys], v[:keys], seg, 0.9)
        assert_close(out, ref_out, RTOL, f"flex out {seg}")
        assert_close(lse, ref_lse, RTOL, f"flex lse {seg}")


# --- the models under CP against each document alone -------------------------------------------------------------


def _exact_worker(rank, world, cases, checks=()):
    ids = torch.randint(3, VOCAB, (1, sum(DOCS)), generator=torch.Generator().manual_seed(1))
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[0, torch.tensor(DOCS).cumsum(0) - 1] = -100
    position_ids = torch.cat([torch.arange(n) for n in DOCS])[None]
    for family, mode, ulysses_size, checkpointing in cases:
        name = f"{family} {mode} rank {rank}{' checkpointed' if checkpointing else ''}"
        model = build(family)
        ref_logits, ref_grads = per_document(model, ids, DOCS)
        mesh = build_mesh(ContextParallelConfig(size=world, mode=mode, ulysses_size=ulysses_size), "cpu")
        apply_context_parallel(model, mesh.config, mesh=mesh)
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.train()
        shard = functools.partial(mesh.layout.shard, cp_rank=mesh.cp_rank, dim=1)
        logits = model(input_ids=shard(ids), position_ids=shard(position_ids)).logits
        torch.nn.functional.cross_entropy(logits[0], shard(targets)[0], reduction="sum").backward()
        assert forward_documents.current() is None, f"{name}: documents still current after the forward"
        assert_close(logits.detach(), shard(ref_logits), RTOL, f"{name} logits")
        for key, param in model.named_parameters():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            dist.all_reduce(grad, group=mesh.cp_group)
            assert_close(grad, ref_grads.get(key, torch.zeros_like(param)), RTOL, f"{name} gradient of {key}")
    for check in checks:  # in the same processes
        check(rank, world)


def test_every_variant_in_every_mode_equals_each_document_alone():
    cases = [(family, mode, None, False) for family in FAMILIES for mode in MODES]
    cases += [("nemotron", "zigzag", None, True), ("gpt_oss", "ulysses", None, True)]
    run_distributed(_exact_worker, 2, cases, (_documents_live_for_one_forward,))


def test_sinks_and_softcap_in_hybrid_mode():
    """Ulysses 2 × ring 2: heads scattered before the ring, each rank with its heads' sinks."""
    cases = [(family, "hybrid", 2, False) for family in ("gpt_oss", "gemma2", "llama4_text")]
    run_distributed(_exact_worker, 4, cases)


def _documents_live_for_one_forward(rank, world):
    """Nemotron's attention gets the documents through the forward's mask only: called on its own after a forward
    (no documents current, none in its call), it raises instead of reading the boundaries of another forward."""
    model = build("nemotron")
    mesh = build_mesh(ContextParallelConfig(size=world, mode="zigzag"), "cpu")
    apply_context_parallel(model, mesh.config, mesh=mesh)
    position_ids = torch.cat([torch.arange(n) for n in DOCS])[None]
    shard = lambda t: mesh.layout.shard(t, mesh.cp_rank, dim=1)  # noqa: E731
    model(input_ids=shard(torch.randint(3, VOCAB, (1, sum(DOCS)))), position_ids=shard(position_ids))
    assert forward_documents.current() is None
    hidden = torch.randn(1, sum(DOCS) // world, COMMON["hidden_size"])
    embeddings = model.model.rotary_emb(hidden, shard(position_ids))
    mask = transformers.masking_utils.create_causal_mask(
        model.config, hidden, None, None, position_ids=shard(position_ids)
    )
    assert mask.documents is None  # built outside a CP forward
    with pytest.raises(ValueError, match="global document boundaries"):
        model.model.layers[0].self_attn(hidden_states=hidden, attention_mask=mask, position_embeddings=embeddings)


# --- training under transformers_cp.Trainer against the stock Trainer ---------------------------------------------

TRAINER_FAMILIES = {"gpt_oss": "eager", "gemma2": "eager", "nemotron": "sdpa", "llama4_text": "sdpa"}
TRAINER_CASES = [("gpt_oss", "zigzag"), ("gemma2", "llama3"), ("nemotron", "ulysses"), ("llama4_text", "zigzag")]
PADDED_REFERENCE = {"gpt_oss"}
"""Families whose stock attention does not keep packed documents apart (gpt-oss's eager attention over a row packed by
DataCollatorWithFlattening differs from each document alone from the second document on): their stock run takes
the same examples as padded rows with an attention mask, which gives the same loss (a sum over the same targets over
their count) with every example on its own."""


def pad_rows(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded rows: input_ids, labels (-100 on padding) and attention_mask."""
    width = max(len(e["input_ids"]) for e in examples)

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in examples])

    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
    return {"input_ids": padded("input_ids", 0), "labels": padded("labels", -100), "attention_mask": mask}


def _stock_run(family: str) -> dict:
    padded = family in PADDED_REFERENCE
    trainer = StockTrainer(
        model=build(family, reference=True, attn=TRAINER_FAMILIES[family]),
        args=transformers.TrainingArguments(**arguments()),
        data_collator=pad_rows if padded else transformers.DataCollatorWithFlattening(),
        train_dataset=sft_dataset(13, 0),
        eval_dataset=sft_dataset(7, 1),
    )
    return train_and_record(trainer)


def _trainer_worker(rank, world, ref_dir, cases):
    for family, mode in cases:
        args = transformers_cp.TrainingArguments(**arguments(context_parallel_size=world, context_parallel_mode=mode))
        trainer = CPTrainer(
            model=build(family, reference=False, attn=TRAINER_FAMILIES[family]),
            args=args,
            train_dataset=sft_dataset(13, 0),
            eval_dataset=sft_dataset(7, 1),
        )
        expected = torch.load(os.path.join(ref_dir, f"{family}.pt"))
        assert_same_run(train_and_record(trainer), expected, f"{family} {mode} rank {rank}")


def test_trainer_equals_the_stock_trainer_with_flattening(tmp_path):
    for family, _ in TRAINER_CASES:
        torch.save(_stock_run(family), tmp_path / f"{family}.pt")
    run_distributed(_trainer_worker, 2, str(tmp_path), TRAINER_CASES)


def test_llama4_temperature_tuning_is_refused_where_it_scales():
    """Llama 4's temperature tuning scales the queries of its layers without RoPE by their index in the attention's
    input (under CP, the shard's): exact while the row is shorter than floor_scale (the scale is 1), refused beyond."""
    config = transformers.Llama4TextConfig(
        **COMMON, **dict(FAMILIES["llama4_text"], no_rope_layers=[1, 0], floor_scale=16, attn_temperature_tuning=True)
    )
    model = apply_context_parallel(
        transformers.AutoModelForCausalLM.from_config(config), ContextParallelConfig(size=1)
    )
    ids = torch.randint(3, VOCAB, (1, 16))
    model(input_ids=ids[:, :15], position_ids=torch.arange(15)[None])
    with pytest.raises(ValueError, match=r"temperature tuning on a row of 16 tokens \(floor_scale=16\)"):
        model(input_ids=ids, position_ids=torch.arange(16)[None])
