"""examples/train.py, the README's main job: resume from the newest complete checkpoint continues at the saved step
with the uninterrupted run's losses and weights; text records train as their token ids; the tokenizer is saved with
the model; empty or malformed data, `--fsdp` on CPU and a resume without checkpoints are clear errors; ZeRO-3 builds
the model inside `zero.Init` over the whole job (2 gloo processes, CP=2)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch
import torch.distributed as dist
import transformers
from distributed import run_distributed
from reference import assert_close
from safetensors.torch import load_file
from trainer_cases import RTOL

import transformers_cp

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
TINY = ["--hidden_size", "32", "--num_heads", "4", "--num_kv_heads", "2", "--disable_tqdm", "true"]
TEXTS = ["the cat sat on the mat", "a dog ran", "the dog sat on a cat and the mat ran", "a mat", "the cat ran on"]


def example():
    """examples/train.py as a module (a name of its own: benchmarks/ has a train.py too)."""
    if "example_train" not in sys.modules:
        spec = importlib.util.spec_from_file_location("example_train", os.path.join(EXAMPLES, "train.py"))
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclass looks itself up there
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["example_train"]


def tokenizer_model_dir(path: str) -> transformers.PreTrainedTokenizerFast:
    """A local Mistral model directory (config, no weights) with a word-level tokenizer of TEXTS' words (Mistral:
    AutoTokenizer keeps a hand-made tokenizer as it is for this model type)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(path)
    config = transformers.MistralConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, sliding_window=None,
    )  # fmt: skip
    config.save_pretrained(path)
    return tokenizer


def write_jsonl(path: str, records: list) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def test_records(tmp_path):
    train = example()
    tokenizer = tokenizer_model_dir(str(tmp_path / "model"))
    eos = tokenizer.eos_token_id
    path = write_jsonl(
        str(tmp_path / "data.jsonl"),
        [{"text": "the cat sat"}, {"prompt": "a dog", "completion": "ran"}, {"input_ids": [5, 6, 7]}],
    )
    text, pair, ids = train.load_jsonl(path, tokenizer)
    cat = tokenizer("the cat sat")["input_ids"]
    assert len(cat) == 3 and text == {"input_ids": cat + [eos], "labels": cat + [eos]}
    prompt, completion = tokenizer("a dog")["input_ids"], tokenizer("ran")["input_ids"]
    assert pair == {"input_ids": prompt + completion + [eos], "labels": [-100, -100] + completion + [eos]}
    assert ids == {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}


@pytest.mark.parametrize(
    "lines, tokenizer, message",
    [
        ([], True, r"--data .*empty.jsonl holds no records; each line must be one JSON object"),
        (["", "  "], True, r"holds no records"),
        (['{"text": "a"}', "{not json"], True, r"empty.jsonl, line 2 is not JSON"),
        (["[1, 2]"], True, r"line 1 is a list, not an object"),
        (['{"content": "a"}'], True, r"line 1 has the keys \['content'\]; each line must be one JSON object"),
        (['{"text": "a"}'], False, r"line 1: text records need a tokenizer, and --model has none"),
        (['{"input_ids": [1, 2], "labels": [1]}'], True, r"line 1: .* labels .* as long as it; got 2 input_ids and 1"),
        (['{"input_ids": []}'], True, r"line 1: input_ids must be a non-empty list"),
    ],
)
def test_bad_data_names_the_file_and_the_fix(tmp_path, lines, tokenizer, message):
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=message):
        example().load_jsonl(str(path), tokenizer_model_dir(str(tmp_path / "model")) if tokenizer else None)


def test_settings_refused_before_training(tmp_path):
    train = example()
    with pytest.raises(ValueError, match="--fsdp needs GPUs: on CPU accelerate runs the processes under DDP"):
        train.main(["--output_dir", str(tmp_path), "--fsdp", *TINY])
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint last: .* holds no complete checkpoint-<step>"):
        train.main(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "last", *TINY])
    path = write_jsonl(str(tmp_path / "one.jsonl"), [{"input_ids": [1, 2, 3]}])
    with pytest.raises(ValueError, match=r"one.jsonl: 1 example\(s\), of which 1 held out .* leave none to train"):
        train.main(["--output_dir", str(tmp_path), "--data", path, *TINY])


def _record_micro_step_losses(losses: list) -> None:
    training_step = transformers_cp.Trainer.training_step

    def recording(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        losses.append(loss.item())
        return loss

    transformers_cp.Trainer.training_step = recording


def _logged(output_dir: str, checkpoint: str) -> dict[int, float]:
    with open(os.path.join(output_dir, checkpoint, "trainer_state.json")) as f:
        return {h["step"]: h["loss"] for h in json.load(f)["log_history"] if "loss" in h}


def _assert_same_weights(output_dir: str, expected_dir: str) -> None:
    actual = load_file(os.path.join(output_dir, "model.safetensors"))
    expected = load_file(os.path.join(expected_dir, "model.safetensors"))
    assert actual.keys() == expected.keys()
    for name, weight in expected.items():
        assert_close(actual[name], weight, RTOL, name)


def _worker(rank, world, root):
    train, losses = example(), []
    _record_micro_step_losses(losses)
    run = ["--max_steps", "6", "--save_steps", "2", "--save_total_limit", "3", "--num_examples", "24"]
    run += ["--min_length", "32", "--max_length", "96", "--eval_strategy", "no", *TINY]

    # Uninterrupted: 6 steps of 2 micro-batches, checkpoints 2, 4, 6 (3 optimizer steps per epoch).
    full, resumed = os.path.join(root, "full"), os.path.join(root, "resumed")
    train.main(["--output_dir", full, *run])
    uninterrupted = losses[:]
    assert len(uninterrupted) == 12
    # An interrupted run as a kill leaves it: checkpoints 2 and 4, and checkpoint-6 half written.
    if rank == 0:
        for step in (2, 4, 6):
            shutil.copytree(os.path.join(full, f"checkpoint-{step}"), os.path.join(resumed, f"checkpoint-{step}"))
        os.remove(os.path.join(resumed, "checkpoint-6", "trainer_state.json"))
    dist.barrier()
    losses.clear()
    train.main(["--output_dir", resumed, "--resume_from_checkpoint", "last", *run])
    # Continued at step 5 (mid-epoch, one batch skipped) from checkpoint-4, not from the start nor the partial one.
    assert len(losses) == 4, losses
    assert_close(torch.tensor(losses), torch.tensor(uninterrupted[8:]), RTOL, "resumed micro-step losses")
    logged, expected = _logged(resumed, "checkpoint-6"), _logged(full, "checkpoint-6")
    assert logged.keys() == expected.keys() == set(range(1, 7))
    assert_close(torch.tensor(list(logged.values())), torch.tensor(list(expected.values())), RTOL, "logged losses")
    dist.barrier()  # rank 0 has written the final model
    _assert_same_weights(resumed, full)

    # Text records train as the same records given as token ids; the tokenizer is saved with the model.
    model_dir = os.path.join(root, "model")
    if rank == 0:
        tokenizer = tokenizer_model_dir(model_dir)
        write_jsonl(os.path.join(root, "text.jsonl"), [{"text": t} for t in TEXTS * 4])
        ids = [{"input_ids": tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]} for t in TEXTS * 4]
        write_jsonl(os.path.join(root, "ids.jsonl"), ids)
    dist.barrier()
    short = ["--max_steps", "2", "--eval_strategy", "no", "--model", model_dir, *TINY]
    results = {}
    for name in ("text", "ids"):
        losses.clear()
        train.main(["--output_dir", os.path.join(root, name), "--data", os.path.join(root, f"{name}.jsonl"), *short])
        results[name] = losses[:]
    assert len(results["text"]) == 4
    assert_close(torch.tensor(results["text"]), torch.tensor(results["ids"]), RTOL, "text records")
    dist.barrier()
    for saved in ("text", "text/checkpoint-2"):
        reloaded = transformers.AutoTokenizer.from_pretrained(os.path.join(root, saved))
        assert (
            reloaded(TEXTS[2])["input_ids"]
            == transformers.AutoTokenizer.from_pretrained(model_dir)(TEXTS[2])["input_ids"]
        )

    # ZeRO-3 (the docs' config, CPU offload): the model is built inside zero.Init over both processes. Last: the
    # DeepSpeed config stays registered with transformers for the rest of the process.
    losses.clear()
    trainer = train.main(
        ["--output_dir", os.path.join(root, "zero3"), "--deepspeed", os.path.join(EXAMPLES, "ds_zero3_offload.json")]
        + ["--max_steps", "1", "--num_examples", "12", "--max_length", "96", "--eval_strategy", "no", *TINY]
    )
    assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine"
    assert all(p.ds_numel > p.ds_tensor.numel() for p in trainer.model.parameters() if p.ds_numel > 1)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_example_resumes_tokenizes_and_saves(tmp_path):
    run_distributed(_worker, 2, str(tmp_path))
