"""Every way transformers marks the documents of a packed row keeps them apart under CP: logits and parameter
gradients (float32, rtol 1e-5) equal the stock model's on the reference batch of each set-up.

References: a row whose documents are marked only by cu_seq_lens or seq_idx gets position_ids restarting per document,
as DataCollatorWithFlattening gives them by default (the stock model's own result there depends on the attention
backend: flash attention reads cu_seq_lens, sdpa reads neither); a dataset packed offline, whose examples carry
position_ids restarting inside them, is the stock model on the default collator's (examples, L) batch, where
transformers finds the documents in the position_ids and shifts labels within each example. Labels are shifted once
over the row as the stock loss does, so a custom `separator_id` is a target as in the stock run.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import transformers
from distributed import run_distributed
from reference import assert_close
from tokenizers import Tokenizer, models
from trainer_cases import VOCAB, build_model, sft_dataset

from transformers_cp import ContextParallelCollator, ContextParallelConfig, Layout, gather_sequence, shard_batch
from transformers_cp.mesh import build_mesh
from transformers_cp.modeling import apply_context_parallel, remove_context_parallel
from transformers_cp.sharding import BATCH_PROBLEM, pack_row

Flattening = transformers.DataCollatorWithFlattening
FAMILY_MODES = [("llama", "zigzag"), ("qwen3", "ulysses"), ("gpt2", "llama3")]  # gpt2: learned absolute positions
SEPARATOR = 5


def packed_offline(seed: int) -> list[dict[str, list[int]]]:
    """Two examples of 40 tokens, each packing documents whose position_ids restart inside it. The first example
    masks each document's first label, the second does not (the stock loss then predicts across the boundary)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths, mask_starts in (([7, 21, 12], True), ([16, 1, 23], False)):
        ids = torch.randint(0, VOCAB, (40,), generator=g).tolist()
        labels = list(ids)
        labels[:3] = [-100] * 3  # a prompt
        positions, start = [], 0
        for n in lengths:
            positions += list(range(n))
            if mask_starts:
                labels[start] = -100
            start += n
        out.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return out


def _flat(collator: Flattening, features) -> dict:
    return collator(features, return_tensors="pt")


# name -> (this rank's CP batch from (mesh, features), the stock model's reference batch from features)
SETUPS = {
    "cu_seq_lens without position_ids (collator)": (
        lambda mesh, f: ContextParallelCollator(mesh, Flattening(return_position_ids=False, return_flash_attn_kwargs=True))(f),
        lambda f: _flat(Flattening(), f),
    ),
    "cu_seq_lens without position_ids (shard_batch)": (
        lambda mesh, f: shard_batch(_flat(Flattening(return_position_ids=False, return_flash_attn_kwargs=True), f), mesh),
        lambda f: _flat(Flattening(), f),
    ),
    "seq_idx only": (
        lambda mesh, f: ContextParallelCollator(mesh, Flattening(return_position_ids=False, return_seq_idx=True))(f),
        lambda f: _flat(Flattening(), f),
    ),
    "every marker": (
        lambda mesh, f: ContextParallelCollator(mesh, Flattening(return_flash_attn_kwargs=True, return_seq_idx=True))(f),
        lambda f: _flat(Flattening(), f),
    ),
    "separator_id": (
        lambda mesh, f: ContextParallelCollator(mesh, Flattening(separator_id=SEPARATOR))(f),
        lambda f: _flat(Flattening(separator_id=SEPARATOR), f),
    ),
    "packed offline, default collator": (
        lambda mesh, f: ContextParallelCollator(mesh)(f),
        transformers.default_data_collator,
    ),
}  # fmt: skip
OFFLINE = "packed offline, default collator"


def _model(family: str) -> transformers.PreTrainedModel:
    if family != "gpt2":
        return build_model(family, reference=True)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, attn_pdrop=0.0, resid_pdrop=0.0,
        embd_pdrop=0.0, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _reference(model, batch: dict) -> tuple[torch.Tensor, dict]:
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out.logits.detach().reshape(1, -1, out.logits.shape[-1]), grads


def _model_worker(rank, world):
    for family, mode in FAMILY_MODES:
        mesh = build_mesh(ContextParallelConfig(size=world, mode=mode), "cpu")
        for name, (cp_batch, reference_batch) in SETUPS.items():
            features = packed_offline(3) if name == OFFLINE else sft_dataset(4, 11)
            what = f"{family} {mode} {name}"
            model = _model(family)
            ref_logits, ref_grads = _reference(model, reference_batch(features))
            apply_context_parallel(model, mesh.config, mesh=mesh)
            shard = cp_batch(mesh, features)
            inputs = {k: shard[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")}
            num_tokens = ref_logits.shape[1]
            logits = gather_sequence(model(**inputs).logits, mesh)[:, :num_tokens]
            assert_close(logits, ref_logits, 1e-5, f"{what} logits")
            targets = gather_sequence(shard["shift_labels"], mesh)[0, :num_tokens]
            torch.nn.functional.cross_entropy(logits[0], targets).backward()
            for n, p in model.named_parameters():
                dist.all_reduce(p.grad, group=mesh.cp_group)
                assert_close(p.grad, ref_grads[n], 1e-5, f"{what} grad {n}")
            # Called directly without position_ids, every shard would restart at 0: every rank refuses.
            with pytest.raises(ValueError, match="needs position_ids"):
                model(input_ids=inputs["input_ids"], cu_seq_lens_q=inputs["cu_seq_lens_q"])
            remove_context_parallel(model)


def test_every_document_marker_matches_the_stock_model():
    run_distributed(_model_worker, 2)


# ---- collation, single process -------------------------------------------------------------------------------------

MESHES = [SimpleNamespace(layout=Layout("zigzag", 2, 1), cp_rank=r) for r in range(2)]


def test_a_padding_collator_keeps_the_examples_position_ids():
    """The stock Trainer's collator when a tokenizer is given: equal to the default collator's path (as the pads are
    removed, an all-ones attention_mask says nothing about documents)."""
    vocab = {str(i): i for i in range(VOCAB)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="0")), pad_token="0", unk_token="0"
    )
    padding = transformers.DataCollatorWithPadding(tokenizer)
    features = packed_offline(4)
    for mesh in MESHES:
        ours, wrapped = ContextParallelCollator(mesh)(features), ContextParallelCollator(mesh, padding)(features)
        assert ours.keys() == wrapped.keys()
        for key in ours:
            assert torch.equal(ours[key], wrapped[key]), key
    assert ContextParallelCollator(MESHES[0])(features)["cu_seq_lens_q"].tolist() == [0, 7, 28, 40, 56, 57, 80]


def _flattened(**options) -> dict:
    return _flat(Flattening(return_flash_attn_kwargs=True, return_seq_idx=True, **options), sft_dataset(3, 2))


def _moved(batch: dict, key: str) -> dict:
    moved = batch[key].clone()
    moved.reshape(-1)[1] += 1
    return {**batch, key: moved}


@pytest.mark.parametrize(
    "batch,message",
    [
        (_moved(_flattened(), "cu_seq_lens_q"), ["inconsistently", "cu_seq_lens_q", "position_ids", "agree"]),
        (_moved(_flattened(), "cu_seq_lens_k"), ["inconsistently", "cu_seq_lens_k"]),
        (_moved(_flattened(), "position_ids"), ["inconsistently", "position_ids"]),
        ({**_flattened(), "seq_idx": torch.zeros(1, _flattened()["input_ids"].shape[1])}, ["seq_idx gives"]),
        ({**_flattened(), "cu_seq_lens_q": torch.tensor([0, 5])}, ["cu_seq_lens_q=[0, 5]", "end at the row's length"]),
        ({**_flattened(), "cu_seq_lens_q": torch.tensor([0, 9, 9, 50])}, ["strictly increase"]),
        ({**_flattened(), "seq_idx": torch.zeros(1, 3)}, ["seq_idx has shape (1, 3)"]),
    ],
)
def test_inconsistent_document_markers_are_refused(batch, message):
    """Refused while the row is readied (a `BatchError`, which the collator and `shard_batch` hand to the model's
    hook, so that every rank of the job raises it)."""
    with pytest.raises(ValueError) as error:
        pack_row(batch, 4)
    for part in message:
        assert part in str(error.value), (part, str(error.value))


def test_examples_position_ids_of_the_wrong_length_are_refused():
    features = packed_offline(5)
    features[1]["position_ids"] = features[1]["position_ids"][:-1]
    shard = ContextParallelCollator(MESHES[0])(features)  # a stand-in shard that carries the error to the model
    assert "39 position_ids for 40 input_ids" in bytes(shard[BATCH_PROBLEM].tolist()).decode()
