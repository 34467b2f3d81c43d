"""The bad-input matrix: every bad setting, model or batch ends every process with a clear error that names the setting
and the fix, and every data edge case gives the result of the run without context parallelism.

Single-process cases check settings, models and collation (nothing there talks to other ranks). The distributed
cases run in one spawned gloo job per world size (a module fixture) that goes through every case in turn, with a
timeout far below the harness's: a case that deadlocked would fail them all. In the disagreement cases only one rank
(or one data-parallel group of the c=2 × d=2 job) gets the bad input, and every rank of the job must raise the same
error.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import pytest
import torch
import torch.distributed as dist
import transformers
from distributed import run_distributed
from reference import assert_close
from trainer_cases import VOCAB, arguments, build_model, sft_dataset, tiny_config

from transformers_cp import ContextParallelCollator, ContextParallelConfig, ContextParallelConfigError
from transformers_cp import TrainingArguments as CPTrainingArguments
from transformers_cp.loss import count_label_tokens, loss_scale, reduce_loss_for_logging
from transformers_cp.mesh import build_mesh
from transformers_cp.model_checks import check_model
from transformers_cp.modeling import apply_context_parallel
from transformers_cp.sharding import pack_row

RTOL = 1e-5
SPAWN_TIMEOUT = 240.0  # far below pytest's 600 s: a deadlocked case fails the fixture instead of hanging the suite

# ---- settings --------------------------------------------------------------------------------------------------

CONFIG_CASES = [
    pytest.param(dict(size=0), 1, ["context_parallel_size", ">= 1"], id="size-zero"),
    pytest.param(dict(size=True), 1, ["context_parallel_size", "integer"], id="size-bool"),
    pytest.param(dict(size="2"), 1, ["context_parallel_size", "integer"], id="size-string"),
    pytest.param(
        dict(size=3), 4, ["context_parallel_size=3", "divide the number of processes (4)"], id="size-vs-world"
    ),
    pytest.param(dict(mode="rings"), 1, ["context_parallel_mode='rings'", "zigzag"], id="mode-unknown"),
    pytest.param(dict(backend="cuda"), 1, ["context_parallel_backend='cuda'", "flash_attn"], id="backend-unknown"),
    pytest.param(dict(mode="llama3", heads_k_stride=0), 1, ["context_parallel_heads_k_stride"], id="stride-zero"),
    pytest.param(dict(mode="llama3", heads_k_stride=1.5), 1, ["context_parallel_heads_k_stride"], id="stride-float"),
    pytest.param(
        dict(mode="hybrid", size=4, ulysses_size=3), 4, ["ulysses_size=3", "divisor of 4"], id="hybrid-indivisible"
    ),
    pytest.param(dict(mode="hybrid", size=2, ulysses_size=4), 2, ["ulysses_size=4", "divide"], id="hybrid-too-large"),
    pytest.param(dict(mode="hybrid", ulysses_size=3), 4, ["ulysses_size=3", "divide"], id="hybrid-vs-world"),
    pytest.param(
        dict(mode="hybrid", size=4, ulysses_size=0), 4, ["context_parallel_ulysses_size", ">= 1"], id="hybrid-zero"
    ),
    pytest.param(
        dict(mode="hybrid", size=4, ulysses_size=2.0),
        4,
        ["context_parallel_ulysses_size", "integer"],
        id="hybrid-float",
    ),
    pytest.param(
        dict(mode="zigzag", size=4, ulysses_size=2), 4, ["only used with", "'hybrid'"], id="degree-without-hybrid"
    ),
    pytest.param(
        dict(mode="zigzag", size=2, heads_k_stride=2),
        2,
        ["context_parallel_heads_k_stride", "'llama3'"],
        id="stride-without-llama3",
    ),
    pytest.param(dict(recompute_layers=-1), 1, ["context_parallel_recompute_layers", ">= 0"], id="recompute-negative"),
    pytest.param(
        dict(recompute_layers=1.0), 1, ["context_parallel_recompute_layers", "integer"], id="recompute-float"
    ),
    pytest.param(dict(auto_recompute=1), 1, ["context_parallel_auto_recompute", "True or False"], id="auto-recompute"),
    pytest.param(dict(balance="work"), 2, ["context_parallel_balance='work'", "tokens, documents"], id="balance-name"),
    pytest.param(
        dict(mode="ulysses", balance="documents"),
        2,
        ["context_parallel_balance='documents'", "ring, zigzag, llama3", "'tokens'"],
        id="balance-ulysses",
    ),
]


@pytest.mark.parametrize("kwargs,world,words", CONFIG_CASES)
def test_config(kwargs, world, words):
    with pytest.raises(ContextParallelConfigError) as error:
        ContextParallelConfig(**kwargs).resolved(world)
    _assert_names(str(error.value), words)


ARGUMENT_CASES = [
    pytest.param(
        dict(label_smoothing_factor=0.1), "2", ["label_smoothing_factor=0.1", "set it to 0"], id="label-smoothing"
    ),
    pytest.param(
        dict(train_sampling_strategy="batch_rebalance"), "2", ["batch_rebalance", "'random'"], id="batch-rebalance"
    ),
    pytest.param(dict(neftune_noise_alpha=5.0), "2", ["neftune_noise_alpha=5.0", "leave it unset"], id="neftune"),
    pytest.param(
        dict(parallelism_config="cp"), "2", ["parallelism_config.cp_size=2", "use one of them"], id="accel-cp"
    ),
]


@pytest.mark.parametrize("kwargs,world,words", ARGUMENT_CASES)
def test_training_arguments(tmp_path, monkeypatch, kwargs, world, words):
    monkeypatch.setenv("WORLD_SIZE", world)
    if kwargs.get("parallelism_config") == "cp":
        from accelerate import ParallelismConfig

        kwargs = {**kwargs, "parallelism_config": ParallelismConfig(cp_size=2)}
    kwargs = {"context_parallel_size": 2, "use_cpu": True, **kwargs}
    with pytest.raises(ContextParallelConfigError) as error:
        CPTrainingArguments(output_dir=str(tmp_path), **kwargs)
    _assert_names(str(error.value), words)


# ---- models ----------------------------------------------------------------------------------------------------


def _small(config_class, **kwargs) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_config(config_class(vocab_size=VOCAB, **kwargs))


def _llama(**overrides) -> transformers.PreTrainedModel:
    config = tiny_config("llama")
    for key, value in overrides.items():
        setattr(config, key, value)
    return transformers.AutoModelForCausalLM.from_config(config)


_TINY = dict(num_hidden_layers=2, hidden_size=16, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
_TINY_MOE = dict(_TINY, head_dim=8, num_local_experts=2, num_experts_per_tok=1)


def _llama_with_convolution() -> transformers.PreTrainedModel:
    """A model whose decoder layer holds a 1-D convolution (as a custom token mixer would)."""
    model = _llama()
    model.model.layers[0].mixer = torch.nn.Conv1d(32, 32, 3, groups=32)
    return model


MODEL_CASES = [
    pytest.param(
        lambda: _llama(num_attention_heads=6, num_key_value_heads=6, hidden_size=36),
        dict(size=4, mode="ulysses"),
        ["6 query heads", "Ulysses degree 4", "context_parallel_ulysses_size"],
        id="ulysses-heads",
    ),
    pytest.param(
        lambda: _llama(num_attention_heads=6, num_key_value_heads=6, hidden_size=36),
        dict(size=8, mode="hybrid", ulysses_size=4),
        ["6 query heads", "Ulysses degree 4", "context_parallel_mode='hybrid'"],
        id="hybrid-heads",
    ),
    pytest.param(
        lambda: _llama(),
        dict(size=2, mode="llama3", heads_k_stride=3),
        ["context_parallel_heads_k_stride=3", "4 key/value heads", "[1, 2, 4]"],
        id="llama3-stride",
    ),
    pytest.param(
        lambda: _llama(attention_dropout=0.1), dict(size=2), ["attention_dropout=0.1", "=0.0"], id="attention-dropout"
    ),
    pytest.param(
        lambda: _small(transformers.GPT2Config, n_layer=1, n_embd=16, n_head=2),
        dict(size=2),
        ["attn_pdrop=0.1", "attn_pdrop=0.0"],
        id="gpt2-dropout",
    ),
    pytest.param(
        lambda: _small(
            transformers.FalconConfig, num_hidden_layers=1, hidden_size=16, num_attention_heads=2, alibi=True
        ),
        dict(size=2),
        ["ALiBi position biases", "RoPE"],
        id="falcon-alibi",
    ),
    pytest.param(  # attention computed by the model itself, behind an undeclared AttentionInterface
        lambda: _small(transformers.BloomConfig, n_layer=1, hidden_size=16, n_head=2),
        dict(size=2),
        ["BloomForCausalLM", "_supports_attention_backend", "(BloomAttention) compute attention themselves"],
        id="bloom-own-attention",
    ),
    pytest.param(  # attention through AttentionInterface, but positions numbered by the decoder itself
        lambda: _small(
            transformers.BartConfig,
            d_model=16,
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=16,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=16,
        ),
        dict(size=2),
        ["BartForCausalLM", "_supports_attention_backend", "BartDecoder", "takes no position_ids"],
        id="bart-positions",
    ),  # fmt: skip
    pytest.param(
        lambda: _small(
            transformers.OPTConfig,
            num_hidden_layers=1,
            hidden_size=16,
            ffn_dim=16,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            layerdrop=0.1,
        ),
        dict(size=2),
        ["LayerDrop (layerdrop=0.1)", "which layers to skip", "layerdrop=0.0"],
        id="opt-layerdrop",
    ),  # fmt: skip
    pytest.param(  # gated attention: q_proj also computes a gate, so odysseus cannot split it by heads
        lambda: _small(
            transformers.Qwen3NextConfig,
            head_dim=8,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
            **_TINY,
        ),
        dict(size=2, mode="odysseus"),
        ["context_parallel_mode='odysseus'", "Qwen3NextAttention", "a gate"],
        id="qwen3next-gated-attention-odysseus",
    ),
    pytest.param(  # recurrent layers without an exact path (mixers.py): refused as such, not for their attention
        lambda: transformers.AutoModelForCausalLM.from_config(
            transformers.RwkvConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, attention_hidden_size=16)
        ),
        dict(size=2),
        ["sequence mixers", "RwkvSelfAttention", "no exact context-parallel path"],
        id="rwkv-recurrence",
    ),
    pytest.param(
        lambda: _small(
            transformers.DeepseekV32Config,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            kv_lora_rank=8,
            q_lora_rank=8,
            index_topk=16,
            **dict(_TINY_MOE, num_key_value_heads=2),
        ),
        dict(size=2),
        ["sparse attention", "index_topk=16"],
        id="deepseek-v32-sparse-attention",
    ),
    pytest.param(
        lambda: _small(transformers.DogeConfig, keep_window_size=4, **_TINY),
        dict(size=2),
        ["Doge's dynamic mask", "bias per key and head", "keep_window_size=4", "picks the keys"],
        id="doge-dynamic-mask",
    ),
    pytest.param(
        _llama_with_convolution, dict(size=2), ["model.layers.0.mixer (Conv1d)", "convolutions"], id="conv1d"
    ),
]


@pytest.mark.parametrize("build,settings,words", MODEL_CASES)
def test_model(build, settings, words):
    with pytest.raises(ValueError) as error:
        check_model(build(), ContextParallelConfig(**settings).resolved(settings["size"]))
    _assert_names(str(error.value), words)


# ---- collation -------------------------------------------------------------------------------------------------

COLLATE_CASES = [
    pytest.param(
        lambda: pack_row({"input_ids": torch.zeros(1, 6, dtype=torch.long), "labels": torch.zeros(1, 7)}, 4),
        ["labels has shape (1, 7)", "one labels entry per token"],
        id="labels-misaligned",
    ),
    pytest.param(
        lambda: pack_row({"input_ids": torch.zeros(2, 6, dtype=torch.long)}, 4),
        ["one packed row per step", "ContextParallelCollator"],
        id="unflattened-batch",
    ),
    pytest.param(
        lambda: pack_row({"input_ids": torch.zeros(1, 6, dtype=torch.long), "token_type_ids": torch.zeros(1, 6)}, 4),
        ["'token_type_ids'", "pass only input_ids, position_ids and labels"],
        id="unshardable-key",
    ),
]


@pytest.mark.parametrize("collate,words", COLLATE_CASES)
def test_collation(collate, words):
    with pytest.raises(ValueError) as error:
        collate()
    _assert_names(str(error.value), words)


# ---- every rank, under a real CP group -------------------------------------------------------------------------

_SEQUENCE = ("input_ids", "position_ids", "labels", "shift_labels")


def _on_rank(bad: int, change):
    """A case where rank `bad` alone calls the model with `change(batch, model)` instead of its batch."""

    def call(model, mesh, batch):
        return model(**(change(batch, model) if dist.get_rank() == bad else batch))

    return call


def _collate_on(ranks: set[int], examples: list[dict]):
    """A case where the ranks in `ranks` collate `examples` instead of the batch's (sft_dataset(3, 5))."""

    def call(model, mesh, batch):
        return model(**(ContextParallelCollator(mesh)(examples) if dist.get_rank() in ranks else batch))

    return call


def _edited(edit) -> list[dict]:
    """The batch's examples after `edit(examples)` (lengths of input_ids unchanged unless edit changes them)."""
    examples = [{k: list(v) for k, v in e.items()} for e in sft_dataset(3, 5)]
    edit(examples)
    return examples


def _label(value: int) -> list[dict]:
    return _edited(lambda e: e[2]["labels"].__setitem__(-1, value))


def _changed_token(examples: tuple[int, ...] = (1,)) -> list[dict]:
    """The batch's examples with token 3 of each of `examples` changed (every length unchanged)."""

    def edit(rows):
        for i in examples:
            rows[i]["input_ids"][3] = (rows[i]["input_ids"][3] + 1) % VOCAB

    return _edited(edit)


def _shifted_labels() -> list[dict]:
    """One label too many in the first example, one too few in the second: the row's total is unchanged."""

    def edit(examples):
        examples[0]["labels"].append(-100)
        examples[1]["labels"].pop()

    return _edited(edit)


_EMPTY = [{"input_ids": []}, {"input_ids": []}]


def _trainer_tokens_differ(kind: str):
    """A Trainer (DDP over the job) whose rank 1 reads a dataset with one token changed, lengths equal: every rank
    must stop at the first step. `kind`: "trainer", "sft" (TRL's SFTTrainer) or "dpo" (TRL's DPO, padded rows)."""

    def call(model, mesh, batch):
        import datasets

        import transformers_cp

        changed = dist.get_rank() == 1
        cp = dict(context_parallel_size=2, per_device_train_batch_size=2, max_steps=1)
        if kind == "trainer":
            rows = _changed_token((0, 1, 2)) if changed else sft_dataset(3, 5)
            args = transformers_cp.TrainingArguments(**arguments(**cp))
            trainer = transformers_cp.Trainer(model=build_model("qwen2", False), args=args, train_dataset=rows)
        elif kind == "sft":
            from trl_cases import tokenizer, trl_arguments

            from transformers_cp.trl import SFTConfig, SFTTrainer

            rows = _changed_token((0, 1, 2)) if changed else sft_dataset(3, 5)
            trainer = SFTTrainer(
                model=build_model("qwen2", False),
                args=trl_arguments(SFTConfig, padding_free=True, max_length=None, **cp),
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer(),
            )
        else:
            from trl_cases import preference_rows, tokenizer, trl_arguments

            from transformers_cp.trl import DPOConfig, DPOTrainer

            rows = preference_rows(2, 0)
            if changed:
                rows[0]["chosen"] = rows[0]["chosen"].replace("w", "w1", 1)  # the same number of words
            trainer = DPOTrainer(
                model=build_model("qwen2", False),
                ref_model=build_model("qwen2", False),
                args=trl_arguments(DPOConfig, **cp),
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer(),
            )
        return trainer.train()

    return call


def _everywhere(change):
    return lambda model, mesh, batch: model(**change(batch, model))


def _shorter(batch, model):
    return {k: v[:, :-1] if k in _SEQUENCE else v for k, v in batch.items()}


def _moved_boundary(batch, model):
    cu = batch["cu_seq_lens_q"].clone()
    cu[1] += 1
    return {**batch, "cu_seq_lens_q": cu}


def _merged_documents(batch, model):
    return {**batch, "cu_seq_lens_q": torch.cat([batch["cu_seq_lens_q"][:1], batch["cu_seq_lens_q"][2:]])}


def _embeds(batch, model):
    out = {k: v for k, v in batch.items() if k != "input_ids"}
    return {**out, "inputs_embeds": model.get_input_embeddings()(batch["input_ids"]).detach()}


def _padded(batch, model):
    mask = torch.ones_like(batch["input_ids"])
    mask[0, 0] = 0
    return {**batch, "attention_mask": mask}


def _dense_mask(batch, model):
    length = batch["input_ids"].shape[1]
    return {**batch, "attention_mask": torch.ones(1, 1, length, 2 * length, dtype=torch.bool)}


def _first_token(value: int):
    def change(batch, model):
        ids = batch["input_ids"].clone()
        ids[0, 0] = value
        return {**batch, "input_ids": ids}

    return change


def _long_documents(model, mesh, batch):
    """A 280-token document (the model has 256 positions) in a 400-token row: on the zigzag layout over 2 ranks only
    CP rank 1 holds positions >= 256, yet every rank must raise."""
    ids = torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    return model(**ContextParallelCollator(mesh)([{"input_ids": ids[:280]}, {"input_ids": ids[280:]}]))


def _bidirectional(model, mesh, batch):
    """A masked-LM (bidirectional) model under CP: it must fail on every rank before its attention communicates."""
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    config.attention_probs_dropout_prob = 0.0
    bert = apply_context_parallel(transformers.BertForMaskedLM(config).eval(), mesh.config, mesh=mesh)
    return bert(input_ids=batch["input_ids"], position_ids=batch["position_ids"])


def _three_heads(model, mesh, batch):
    """apply_context_parallel building its own mesh: the head check comes before any process group is made."""
    three = _llama(num_attention_heads=3, num_key_value_heads=3, hidden_size=24)
    return apply_context_parallel(three, ContextParallelConfig(mode="ulysses"))


def _set(**changes):
    return lambda batch, model: {**batch, **changes}


def _without(*keys):
    return lambda batch, model: {k: v for k, v in batch.items() if k not in keys}


# Each case: (id, world, mode, call(model, mesh, batch), words that every rank's error must contain).
ERROR_CASES = [
    ("shorter-shard", 2, "zigzag", _on_rank(1, _shorter), ["local sequence length: [", "ContextParallelCollator"]),
    ("embeds-vs-ids", 2, "zigzag", _on_rank(1, _embeds), ["input kind and dtype", "same packed row"]),
    ("moved-boundary", 2, "zigzag", _on_rank(1, _moved_boundary), ["checksum of cu_seq_lens_q", "same examples"]),
    ("document-count", 2, "zigzag", _on_rank(0, _merged_documents), ["number of document boundaries", "Sampler"]),
    ("num-items", 2, "zigzag", _on_rank(1, _set(num_items_in_batch=torch.tensor(11))), ["num_items_in_batch: [-1, 11]"]),
    ("labels-one-rank", 2, "zigzag", _on_rank(1, _without("labels", "shift_labels")), ["labels given: [3, 0]"]),
    ("train-vs-eval", 2, "zigzag", _on_rank(1, lambda b, m: (m.train(), b)[1]), ["training mode: [0, 1]"]),
    ("padding-mask", 2, "zigzag", _on_rank(1, _padded), ["padding in attention_mask", "CP rank(s) [1]", "Collator"]),
    ("dense-4d-mask", 2, "zigzag", _on_rank(1, _dense_mask), ["custom (4D) attention mask", "position_ids restart"]),
    ("kv-cache", 2, "zigzag", _on_rank(1, _set(past_key_values=transformers.DynamicCache())),
     ["KV cache (past_key_values)", "CP rank(s) [1]", "run generation without"]),
    ("no-position-ids", 2, "zigzag", _on_rank(1, _without("position_ids", "cu_seq_lens_q")),
     ["needs position_ids", "CP rank(s) [1]", "shard_batch"]),
    ("several-rows", 2, "zigzag", _on_rank(1, lambda b, m: {k: v.repeat(2, 1) if k in _SEQUENCE else v for k, v in b.items()}),
     ["one packed row per step", "CP rank(s) [1]"]),
    ("beyond-positions", 2, "zigzag", _long_documents,
     ["document of 280 tokens", "max_position_embeddings", "truncate examples to at most 256"]),
    ("token-out-of-vocab", 2, "zigzag", _on_rank(1, _first_token(VOCAB)), ["to 97, outside the model's vocabulary of 97"]),
    ("negative-token", 2, "zigzag", _on_rank(1, _first_token(-100)), ["from -100", "keep -100 in labels only"]),
    ("output-attentions", 2, "zigzag", _everywhere(_set(output_attentions=True)), ["output_attentions=True"]),
    ("non-causal", 2, "zigzag", _bidirectional, ["bidirectional attention", "causal language models"]),
    ("apply-ulysses-heads", 2, "zigzag", _three_heads, ["3 query heads", "Ulysses degree 2"]),
    ("shorter-shard-ulysses-4", 4, "ulysses", _on_rank(2, _shorter), ["local sequence length: ["]),
    ("moved-boundary-hybrid-4", 4, "hybrid", _on_rank(3, _moved_boundary), ["checksum of cu_seq_lens_q"]),
    ("padding-mask-zigzag-4", 4, "zigzag", _on_rank(3, _padded), ["padding in attention_mask", "CP rank(s) [3]"]),
    # c=2 × d=2: a problem in one data-parallel group stops the other group too
    ("padding-mask-2x2", 4, ("llama", "zigzag", 2), _on_rank(2, _padded),
     ["padding in attention_mask", "CP rank(s) [0] of data-parallel rank 1"]),
    ("shorter-shard-2x2", 4, ("llama", "zigzag", 2), _on_rank(1, _shorter),
     ["context-parallel group (data-parallel rank 0)", "local sequence length: ["]),
    # the token checksum through the Trainer (DDP), TRL's SFTTrainer and DPO's padded rows
    ("trainer-tokens-differ", 2, "zigzag", _trainer_tokens_differ("trainer"), ["packed row (checksum of its tokens"]),
    ("sft-tokens-differ", 2, "zigzag", _trainer_tokens_differ("sft"), ["packed row (checksum of its tokens"]),
    ("dpo-tokens-differ", 2, "zigzag", _trainer_tokens_differ("dpo"), ["packed row (checksum of its tokens"]),
]  # fmt: skip

# Data that only some ranks hold, for two model families on 2 processes (c=2) and on 4 (c=2 × d=2, the bad data in
# one data-parallel group: ranks 2 and 3 are data-parallel rank 1).
_LABEL_WORDS = ["labels range from", "below the model's 97 output classes", "or -100 (no target)"]
for family, mode, world in (
    ("llama", "zigzag", 2),
    ("qwen2", "ulysses", 2),
    ("llama", "zigzag", 4),
    ("qwen2", "llama3", 4),
):
    group = {2, 3} if world == 4 else {0, 1}  # the ranks of one CP group
    one = max(group)  # one rank of it
    dp = " of data-parallel rank 1" if world == 4 else ""
    spec, tag = (family, mode, 2), f"{family}-{world}"
    ERROR_CASES += [
        (f"label-out-of-vocab-{tag}", world, spec, _collate_on(group, _label(VOCAB)), [*_LABEL_WORDS, "to 97"]),
        (f"negative-label-{tag}", world, spec, _collate_on(group, _label(-5)), [*_LABEL_WORDS, "from -5"]),
        (f"tokens-differ-{tag}", world, spec, _collate_on({one}, _changed_token()),
         ["packed row (checksum of its tokens, positions and labels): [", "same examples"]),
        (f"labels-shifted-per-example-{tag}", world, spec, _collate_on(group, _shifted_labels()),
         ["example 0 of the batch has", "one label per token", f"CP rank(s) [0, 1]{dp})"]),
        (f"all-examples-empty-{tag}", world, spec, _collate_on({one}, _EMPTY),
         ["every example of the batch is empty", "dataset.filter", f"CP rank(s) [1]{dp})"]),
    ]  # fmt: skip


# ---- data edge cases: the run without CP is the reference ------------------------------------------------------


def _left_padding(features: list[dict]) -> dict:
    """A user collator that left-pads (as a tokenizer with padding_side='left'): the CP collator removes its pads."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    labels = torch.full((len(features), width), -100)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, width - n :] = torch.tensor(f["input_ids"])
        labels[i, width - n :] = torch.tensor(f["labels"])
        mask[i, width - n :] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _examples(seed: int, lengths: list[int], masked: set[int] = frozenset()) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * n if i in masked else [-100, *ids[1:]]})
    return out


# Each case: (id, world, mode, examples, user collator, examples the stock run sees (None: the same)).
DATA_CASES = [
    ("empty-example", 2, "zigzag", _examples(1, [9, 0, 14]), None, _examples(1, [9, 14])),
    ("one-example-fully-masked", 2, "zigzag", _examples(2, [12, 20, 7], masked={1}), None, None),
    ("every-label-masked", 2, "zigzag", _examples(3, [12, 20], masked={0, 1}), None, None),
    ("one-huge-example", 2, "llama3", _examples(4, [6, 200, 9]), None, None),
    ("exactly-max-positions", 2, "ring", _examples(5, [256, 3]), None, None),
    ("single-token-examples", 2, "ulysses", _examples(6, [1, 17, 1, 1, 8]), None, None),
    ("left-padded-batch", 2, "zigzag", _examples(7, [5, 21, 13]), _left_padding, None),
    ("row-shorter-than-ranks", 4, "zigzag", _examples(8, [3]), None, None),
    ("row-shorter-than-ranks-hybrid", 4, "hybrid", _examples(9, [2, 3]), None, None),
]


def _stock_loss_and_grads(model, examples: list[dict]) -> tuple[torch.Tensor, dict]:
    batch = transformers.DataCollatorWithFlattening(return_tensors="pt")(examples)
    model.zero_grad()
    loss = model(**batch, num_items_in_batch=batch["labels"].ne(-100).sum()).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _cp_loss_and_grads(model, mesh, examples: list[dict], collator) -> tuple[torch.Tensor, dict]:
    batch = ContextParallelCollator(mesh, collator=collator)(examples)
    model.zero_grad()
    n = count_label_tokens(batch["shift_labels"], mesh, across_dp=False)
    loss = model(**batch, num_items_in_batch=n).loss * loss_scale(mesh, across_dp=False)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():  # what DDP does: the mean over the CP ranks
        dist.all_reduce(p.grad, group=mesh.cp_group)
        grads[name] = p.grad / mesh.cp_size
    return reduce_loss_for_logging(loss, mesh), grads


def _compare(stock: tuple, cp: tuple) -> str:
    (stock_loss, stock_grads), (cp_loss, cp_grads) = stock, cp
    if stock_loss.isnan():
        return "ok" if cp_loss.isnan() else f"stock loss is nan, CP loss {cp_loss.item()}"
    assert_close(cp_loss, stock_loss, RTOL, "loss")
    for name, grad in stock_grads.items():
        assert_close(cp_grads[name], grad, RTOL, f"grad {name}")
    return "ok"


# ---- the spawned jobs ------------------------------------------------------------------------------------------


def _model_for(spec: str | tuple, world: int, reference: bool = False):
    """`spec`: a mode (llama, CP over the whole job) or (family, mode, CP size)."""
    family, mode, size = spec if isinstance(spec, tuple) else ("llama", spec, world)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa")
    model.config.use_cache = False
    if reference:
        return model
    settings = dict(size=size, mode=mode, ulysses_size=2 if mode == "hybrid" else None)
    mesh = build_mesh(ContextParallelConfig(**settings), "cpu")
    return apply_context_parallel(model, mesh.config, mesh=mesh), mesh


def _worker(rank: int, world: int, out_dir: str) -> None:
    outcomes = {}
    models = {}
    for name, case_world, mode, call, _ in ERROR_CASES:
        if case_world != world:
            continue
        if mode not in models:
            models[mode] = _model_for(mode, world)
        model, mesh = models[mode]
        model.eval()
        try:
            with torch.no_grad():
                call(model, mesh, ContextParallelCollator(mesh)(sft_dataset(3, 5)))
            outcomes[name] = "no error"
        except Exception as error:  # noqa: BLE001 - the outcome is the error itself
            outcomes[name] = f"{type(error).__name__}: {error}"
        model.eval()
    for name, case_world, mode, examples, collator, stock_examples in DATA_CASES:
        if case_world != world:
            continue
        if mode not in models:
            models[mode] = _model_for(mode, world)
        model, mesh = models[mode]
        model.train()
        reference = _model_for(mode, world, reference=True).train()
        try:
            stock = _stock_loss_and_grads(reference, stock_examples or examples)
            outcomes[name] = _compare(stock, _cp_loss_and_grads(model, mesh, examples, collator))
        except Exception as error:  # noqa: BLE001
            outcomes[name] = f"{type(error).__name__}: {error}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(outcomes, f)


_OUTCOMES: dict[int, list[dict]] = {}


def _outcomes(world: int) -> list[dict]:
    """Every rank's outcome of every case of this world size, from one spawned job (run once per module)."""
    if world not in _OUTCOMES:
        out_dir = tempfile.mkdtemp(prefix="cp_bad_inputs_")
        run_distributed(_worker, world, out_dir, timeout=SPAWN_TIMEOUT)
        _OUTCOMES[world] = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                _OUTCOMES[world].append(json.load(f))
    return _OUTCOMES[world]


@pytest.mark.parametrize("name,world,words", [pytest.param(c[0], c[1], c[4], id=c[0]) for c in ERROR_CASES])
def test_every_rank_raises(name, world, words):
    outcomes = [rank_outcomes[name] for rank_outcomes in _outcomes(world)]
    for rank, outcome in enumerate(outcomes):
        assert outcome.startswith("ValueError"), f"rank {rank}: {outcome}"
        _assert_names(outcome, words)
    assert len(set(outcomes)) == 1, f"the ranks raised different errors: {outcomes}"


@pytest.mark.parametrize("name,world", [pytest.param(c[0], c[1], id=c[0]) for c in DATA_CASES])
def test_data_edge_case_matches_the_run_without_cp(name, world):
    for rank, rank_outcomes in enumerate(_outcomes(world)):
        assert rank_outcomes[name] == "ok", f"rank {rank}: {rank_outcomes[name]}"


MATRIX = {
    "settings": len(CONFIG_CASES) + len(ARGUMENT_CASES),
    "models": len(MODEL_CASES),
    "collation": len(COLLATE_CASES),
    "every-rank errors": len(ERROR_CASES),
    "data edge cases": len(DATA_CASES),
}


def test_matrix_size():
    """At least 30 cases, each one a test above, and docs/reliability.md states how many."""
    total = sum(MATRIX.values())
    assert total >= 30, MATRIX
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "reliability.md")).read()
    stated = re.search(r"The matrix has (\d+) cases", doc)
    assert stated and int(stated.group(1)) == total, f"docs/reliability.md should say: The matrix has {total} cases"


def _assert_names(message: str, words: list[str]) -> None:
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


def test_mask_overlay_is_refused():
    """A model that extends the causal mask with its own function (e.g. bidirectional image tokens) gets a clear
    error from CP attention, not a mask silently ignored; a plain sliding-window mask passes its window on."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from transformers_cp.adapter import MaskWindow, context_parallel_attention_forward

    model = apply_context_parallel(_llama(sliding_window=5), ContextParallelConfig(size=1))
    masks = dict(config=model.config, inputs_embeds=torch.zeros(1, 8, 32), attention_mask=None, past_key_values=None)
    masks["position_ids"] = torch.arange(8)[None]
    assert create_sliding_window_causal_mask(**masks) == MaskWindow(5)
    overlay = create_causal_mask(**masks, or_mask_function=lambda batch, head, q, kv: kv == 0)
    assert overlay == MaskWindow(None, overlay=True)
    q = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="image tokens"):
        context_parallel_attention_forward(model.model.layers[0].self_attn, q, q, q, overlay)


def test_values_the_model_passes_at_call_time_are_refused():
    """A dropout that the model passes to attention is refused even where its config holds it under a field the
    model checks do not know (it would otherwise be dropped silently). Softcaps and sinks are computed
    (tests/test_attention_variants.py)."""
    from transformers_cp.adapter import context_parallel_attention_forward

    model = apply_context_parallel(_llama(), ContextParallelConfig(size=1))
    attention = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match=re.escape("attention dropout (0.1)")):
        context_parallel_attention_forward(attention, q, q, q, None, dropout=0.1)
