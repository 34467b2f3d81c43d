"""TrainingArguments: command-line flags, serialisation, and clear errors on every bad setting before any collective."""

from __future__ import annotations

import json
import warnings

import pytest
import transformers
from trainer_cases import sft_dataset, tiny_config

from transformers_cp import ContextParallelConfig, ContextParallelConfigError, Trainer, TrainingArguments
from transformers_cp.training_args import CHECKPOINTING_FLAG

FLAGS = [
    "--context_parallel_size",
    "4",
    "--context_parallel_mode",
    "hybrid",
    "--context_parallel_ulysses_size",
    "2",
    "--context_parallel_backend",
    "torch",
    "--context_parallel_loss_chunk_size",
    "4096",
    "--context_parallel_mlp_tile_size",
    "0",
    "--context_parallel_recompute_layers",
    "3",
    "--context_parallel_auto_recompute",
    "false",
]


def test_flags_parse_and_serialise(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    (args,) = transformers.HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), *FLAGS]
    )
    assert args.context_parallel_config == ContextParallelConfig(
        size=4,
        mode="hybrid",
        ulysses_size=2,
        backend="torch",
        loss_chunk_size=4096,
        mlp_tile_size=0,
        recompute_layers=3,
        auto_recompute=False,
    )
    saved = json.loads(args.to_json_string())
    assert {k: v for k, v in saved.items() if k.startswith("context_parallel_")} == {
        "context_parallel_size": 4,
        "context_parallel_mode": "hybrid",
        "context_parallel_ulysses_size": 2,
        "context_parallel_heads_k_stride": None,
        "context_parallel_backend": "torch",
        "context_parallel_loss_chunk_size": 4096,
        "context_parallel_mlp_tile_size": 0,
        "context_parallel_offload_activations": False,
        "context_parallel_offload_attention_outputs": False,
        "context_parallel_recompute_layers": 3,
        "context_parallel_auto_recompute": False,
        "context_parallel_balance": "tokens",
    }
    assert TrainingArguments(**{k: saved[k] for k in saved if k.startswith("context_parallel_")}).context_parallel_size
    (llama3,) = transformers.HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--context_parallel_mode", "llama3", "--context_parallel_heads_k_stride", "2",
         "--context_parallel_balance", "documents"]
    )  # fmt: skip
    assert llama3.context_parallel_config.kv_stride(8) == 2
    assert llama3.context_parallel_config.balance == "documents"


def test_defaults_turn_context_parallelism_off(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path))
    assert args.context_parallel_size == 1 and not args.context_parallel_config.enabled


@pytest.mark.parametrize(
    "settings,words",
    [
        (dict(context_parallel_size=0), ["context_parallel_size", ">= 1"]),
        (dict(context_parallel_size=2, context_parallel_mode="rings"), ["context_parallel_mode='rings'", "zigzag"]),
        (dict(context_parallel_size=4, context_parallel_mode="hybrid", context_parallel_ulysses_size=3), ["divisor"]),
        (dict(context_parallel_size=4, context_parallel_ulysses_size=2), ["only used with", "hybrid"]),
        (dict(context_parallel_size=2, context_parallel_backend="cuda"), ["context_parallel_backend='cuda'"]),
        (dict(context_parallel_size=2, context_parallel_heads_k_stride=0), ["context_parallel_heads_k_stride"]),
    ],
)
def test_bad_settings_raise_clear_errors(tmp_path, monkeypatch, settings, words):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ContextParallelConfigError) as error:
        TrainingArguments(output_dir=str(tmp_path), **settings)
    for word in words:
        assert word in str(error.value)


def test_arguments_are_made_and_saved_in_one_process_the_trainer_checks_the_size(tmp_path, monkeypatch):
    """Arguments for a larger job build, save and load in a single process (a login node, a notebook); the Trainer
    built from them there says how to launch."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = TrainingArguments(output_dir=str(tmp_path), context_parallel_size=4, context_parallel_mode="hybrid")
    saved = json.loads(args.to_json_string())
    assert (saved["context_parallel_size"], saved["context_parallel_ulysses_size"]) == (4, None)
    (parsed,) = transformers.HfArgumentParser(TrainingArguments).parse_dict(saved)
    assert parsed.context_parallel_config == args.context_parallel_config
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ContextParallelConfigError) as error:
        Trainer(model=model, args=args, train_dataset=sft_dataset(4, 0))
    for words in ("context_parallel_size=4", "number of processes (1)", "WORLD_SIZE is not set", "torchrun"):
        assert words in str(error.value)


def test_offload_error_names_the_checkpointing_flag_of_this_transformers(tmp_path):
    """The message names the flag the installed transformers takes (activation_checkpointing from 5.23, where
    gradient_checkpointing is a deprecated alias), and setting it as told passes without a deprecation warning."""
    with pytest.raises(ContextParallelConfigError) as error:
        TrainingArguments(output_dir=str(tmp_path), context_parallel_offload_activations=True)
    assert f"set {CHECKPOINTING_FLAG}=True" in str(error.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        TrainingArguments(
            output_dir=str(tmp_path), context_parallel_offload_activations=True, **{CHECKPOINTING_FLAG: True}
        )


def test_unknown_mode_flag_is_rejected_by_the_parser(tmp_path, capsys):
    parser = transformers.HfArgumentParser(TrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--context_parallel_mode", "rings"])
    assert "invalid choice: 'rings'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "settings,words",
    [
        (dict(label_smoothing_factor=0.1), ["label_smoothing_factor=0.1", "set it to 0"]),
        (dict(train_sampling_strategy="batch_rebalance"), ["batch_rebalance", "random"]),
    ],
)
def test_settings_cp_cannot_honour_are_rejected(tmp_path, monkeypatch, settings, words):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ContextParallelConfigError) as error:
        TrainingArguments(output_dir=str(tmp_path), context_parallel_size=2, **settings)
    for word in words:
        assert word in str(error.value)
