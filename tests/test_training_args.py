"""TrainingArguments: command-line flags, serialisation, and clear errors on every bad setting before any collective."""

from __future__ import annotations

import json

import pytest
import transformers

from transformers_cp import ContextParallelConfig, ContextParallelConfigError, TrainingArguments

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
    }
    assert TrainingArguments(**{k: saved[k] for k in saved if k.startswith("context_parallel_")}).context_parallel_size
    (llama3,) = transformers.HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--context_parallel_mode", "llama3", "--context_parallel_heads_k_stride", "2"]
    )
    assert llama3.context_parallel_config.kv_stride(8) == 2


def test_defaults_turn_context_parallelism_off(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path))
    assert args.context_parallel_size == 1 and not args.context_parallel_config.enabled


@pytest.mark.parametrize(
    "settings,words",
    [
        (dict(context_parallel_size=0), ["context_parallel_size", ">= 1"]),
        (dict(context_parallel_size=3), ["context_parallel_size=3", "divide", "processes (4)"]),
        (dict(context_parallel_size=2, context_parallel_mode="rings"), ["context_parallel_mode='rings'", "zigzag"]),
        (dict(context_parallel_size=2, context_parallel_mode="hybrid"), ["context_parallel_ulysses_size"]),
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


def test_size_without_a_launcher_says_how_to_launch(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ContextParallelConfigError, match="torchrun"):
        TrainingArguments(output_dir=str(tmp_path), context_parallel_size=2)


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
