"""Models whose class does not declare transformers' AttentionInterface (`_supports_attention_backend`) but whose
attention goes through it and whose decoder reads position_ids (BioGPT, StableLM, Whisper's decoder): check_model
takes them, and under CP each equals every document of the packed row run alone (logits and every gradient, float32);
and odysseus on attention without positions (Nemotron-H's, whose recurrent layers place the tokens) and on attention
whose output projection is `out_proj` (LFM2's).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import transformers
from distributed import run_distributed
from reference import assert_close, per_document
from test_hybrid import _assert_gradient
from test_hybrid import build as build_hybrid

from transformers_cp import ContextParallelConfig, apply_context_parallel, build_mesh

RTOL = 1e-5
VOCAB = 97
DOCS = [5, 1, 22, 11, 9]  # 48 tokens: a document longer than a rank's shard of 24, one of a single token
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
CONFIGS = {
    "biogpt": lambda: transformers.BioGptConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "stablelm": lambda: transformers.StableLmConfig(**TINY, num_key_value_heads=2, partial_rotary_factor=0.5),
    "whisper": lambda: transformers.WhisperConfig(
        vocab_size=VOCAB,
        d_model=32,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=48,
        encoder_layers=1,
        encoder_attention_heads=4,
        encoder_ffn_dim=48,
        max_target_positions=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        dropout=0.0,
    ),  # fmt: skip
}
CASES = [(family, mode) for family in CONFIGS for mode in ("zigzag", "llama3", "ulysses")]


def build(family: str) -> transformers.PreTrainedModel:
    if family in ("nemotron_h", "lfm2"):
        return build_hybrid(family)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="eager")
    assert not model._supports_attention_backend, f"{family} now declares AttentionInterface: drop it from here"
    return model.eval()


def _worker(rank: int, world: int, cases: list) -> None:
    ids = torch.randint(3, VOCAB, (1, sum(DOCS)), generator=torch.Generator().manual_seed(1))
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[0, torch.tensor(DOCS).cumsum(0) - 1] = -100
    position_ids = torch.cat([torch.arange(n) for n in DOCS])[None]
    for family, mode in cases:
        name = f"{family} {mode} rank {rank}"
        model = build(family)
        ref_logits, ref_grads = per_document(model, ids, DOCS)
        mesh = build_mesh(ContextParallelConfig(size=world, mode=mode), "cpu")
        apply_context_parallel(model, mesh.config, mesh=mesh)
        shard = functools.partial(mesh.layout.shard, cp_rank=mesh.cp_rank, dim=1)
        logits = model(input_ids=shard(ids), position_ids=shard(position_ids)).logits
        torch.nn.functional.cross_entropy(logits[0], shard(targets)[0], reduction="sum").backward()
        assert_close(logits.detach(), shard(ref_logits), RTOL, f"{name} logits")
        # each gradient against its own scale or 1e-3 of the largest, as test_hybrid and the sweep measure them: the
        # key bias's (BioGPT, Whisper) is zero in exact arithmetic (softmax ignores a shift of every key's score)
        floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())
        for key, param in model.named_parameters():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            dist.all_reduce(grad, group=mesh.cp_group)
            _assert_gradient(grad, ref_grads.get(key, torch.zeros_like(param)), floor, f"{name} gradient of {key}")


def test_undeclared_interface_families_equal_each_document_alone():
    run_distributed(_worker, 2, CASES + [("nemotron_h", "odysseus"), ("lfm2", "odysseus")])
