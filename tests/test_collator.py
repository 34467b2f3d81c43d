"""ContextParallelCollator / shard_batch: the shards of every rank rebuild DataCollatorWithFlattening's row, with
labels shifted once over the row and a padding tail without targets; a padding collator's pads are removed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models
from trainer_cases import VOCAB, sft_dataset, tiny_config

from transformers_cp import ContextParallelCollator, ContextParallelConfig, Layout, apply_context_parallel, shard_batch
from transformers_cp.loss import IGNORE_INDEX


def _meshes(kind: str, ring: int, ulysses: int = 1) -> list[SimpleNamespace]:
    """What the collator reads from a mesh (its layout and CP rank), for every rank of one CP group."""
    layout = Layout(kind, ring, ulysses)
    return [SimpleNamespace(layout=layout, cp_rank=r) for r in range(layout.size)]


def _full_row(shards: list[dict], layout: Layout) -> dict:
    keys = ("input_ids", "position_ids", "labels", "shift_labels")
    return {k: layout.unshard([s[k] for s in shards], dim=1) for k in keys}


@pytest.mark.parametrize("kind,ring,ulysses", [("contiguous", 2, 1), ("zigzag", 2, 1), ("zigzag", 2, 2)])
def test_shards_rebuild_the_flattened_row(kind, ring, ulysses):
    features = sft_dataset(3, 7)
    meshes = _meshes(kind, ring, ulysses)
    shards = [ContextParallelCollator(mesh)(features) for mesh in meshes]
    layout = meshes[0].layout
    row = _full_row(shards, layout)
    stock = transformers.DataCollatorWithFlattening(return_tensors="pt")(features)
    length = stock["input_ids"].shape[1]
    padded = row["input_ids"].shape[1]
    assert padded % layout.multiple == 0 and padded - length < layout.multiple
    for key in ("input_ids", "position_ids", "labels"):
        assert torch.equal(row[key][:, :length], stock[key]), key
    # Targets: the stock loss shifts the flattened labels once (its separator -100 ends every document).
    assert torch.equal(row["shift_labels"][:, :length], torch.cat([stock["labels"][:, 1:], torch.tensor([[-100]])], 1))
    assert (row["labels"][:, length:] == IGNORE_INDEX).all() and (row["shift_labels"][:, length:] == -100).all()
    assert torch.equal(row["position_ids"][0, length:], torch.arange(padded - length))  # a document of its own
    bounds = torch.tensor([0, *torch.tensor([len(f["input_ids"]) for f in features]).cumsum(0).tolist()])
    for shard in shards:
        assert torch.equal(shard["cu_seq_lens_q"].long(), bounds)


def _tokenizer(padding_side: str) -> transformers.PreTrainedTokenizerFast:
    vocab = {str(i): i for i in range(VOCAB)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="0")), pad_token="0", unk_token="0"
    )
    tokenizer.padding_side = padding_side
    return tokenizer


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_padding_collator_is_unpadded(padding_side):
    features = sft_dataset(3, 8)
    mesh = _meshes("zigzag", 2)[1]
    padding = transformers.DataCollatorForSeq2Seq(_tokenizer(padding_side), label_pad_token_id=-100)
    ours = ContextParallelCollator(mesh)(features)
    wrapped = ContextParallelCollator(mesh, collator=padding)(features)
    assert ours.keys() == wrapped.keys()
    for key in ours:
        assert torch.equal(ours[key], wrapped[key]), key


def test_a_flattening_collator_is_used_as_is_and_shard_batch_agrees():
    features = sft_dataset(4, 9)
    mesh = _meshes("zigzag", 2)[0]
    flattening = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    wrapped = ContextParallelCollator(mesh, collator=flattening)(features)
    direct = shard_batch(flattening(features, return_tensors="pt"), mesh)
    ours = ContextParallelCollator(mesh)(features)
    assert ours.keys() == wrapped.keys() == direct.keys()
    for key in ours:
        assert torch.equal(ours[key], wrapped[key]) and torch.equal(ours[key], direct[key]), key


def test_a_batch_that_is_not_one_row_is_rejected_by_the_model():
    """shard_batch does not raise on this rank alone (its peers would hang): a stand-in shard without targets carries
    the error to the model's pre-forward hook, which raises it after the ranks' gather (tests/test_bad_inputs.py)."""
    shard = shard_batch({"input_ids": torch.zeros(2, 8, dtype=torch.long)}, _meshes("zigzag", 2)[0])
    assert (shard["shift_labels"] == IGNORE_INDEX).all()
    config = tiny_config("llama")
    model = apply_context_parallel(
        transformers.AutoModelForCausalLM.from_config(config), ContextParallelConfig(size=1)
    )
    with pytest.raises(ValueError, match="one packed row per step"):
        model(**shard)
