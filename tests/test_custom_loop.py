"""examples/custom_loop.py on 2 CP ranks trains exactly as the stock Trainer with DataCollatorWithFlattening on one
process (same data order, SGD, constant learning rate, gradient clipping, accumulation 2)."""

from __future__ import annotations

import importlib
import os
import sys

import torch
from distributed import run_distributed
from reference import assert_close
from trainer_cases import RTOL, build_model, run_stock, sft_dataset

from transformers_cp import ContextParallelConfig

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _worker(rank, world, expected):
    sys.path.insert(0, EXAMPLES)
    custom_loop = importlib.import_module("custom_loop")
    model = build_model("qwen2", reference=False)
    config = ContextParallelConfig(size=world, mode="zigzag")
    losses = custom_loop.train(model, sft_dataset(13, 0), config, learning_rate=0.5, shuffle=False)
    assert_close(torch.tensor(losses), torch.tensor(expected["losses"]), RTOL, "custom loop losses")
    for name, value in model.state_dict().items():
        assert_close(value, expected["weights"][name], RTOL, f"custom loop weight {name}")


def test_custom_loop_example_matches_the_stock_trainer():
    expected = run_stock("qwen2", train_sampling_strategy="sequential", lr_scheduler_type="constant")
    run_distributed(_worker, 2, expected)
