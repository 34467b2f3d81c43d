"""Shared pieces of the Trainer tests: tiny models, a tiny SFT dataset, one training run and its comparison.

A run records what the equivalence is about: the per-step logged losses and gradient norms, the value every rank's
`training_step` returned, the eval loss, predictions and the final weights.
"""

from __future__ import annotations

import tempfile

import torch
import transformers
from reference import assert_close

import transformers_cp

RTOL = 1e-5
VOCAB = 97


def tiny_config(family: str, layers: int = 2) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        attention_dropout=0.0,
    )
    if family == "llama":  # MHA
        return transformers.LlamaConfig(num_key_value_heads=4, **common)
    if family == "qwen2":  # GQA, one KV head
        return transformers.Qwen2Config(num_key_value_heads=1, **common)
    if family == "qwen3":  # GQA, q/k norms, explicit head_dim
        return transformers.Qwen3Config(num_key_value_heads=2, head_dim=8, **common)
    if family == "llama_gqa_bias":  # biases on every projection; 6 query heads over 3 KV heads, groups not aligned
        common.update(hidden_size=48, num_attention_heads=6)
        return transformers.LlamaConfig(num_key_value_heads=3, attention_bias=True, **common)
    if family == "mistral":  # sliding window shorter than the documents
        return transformers.MistralConfig(num_key_value_heads=2, sliding_window=6, **common)
    if family == "deepseek_v3":  # multi-head latent attention: values (8) narrower than queries and keys (6 + 10)
        return transformers.DeepseekV3Config(
            num_key_value_heads=4, qk_rope_head_dim=6, qk_nope_head_dim=10, v_head_dim=8, kv_lora_rank=16,
            q_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, **common,
        )  # fmt: skip
    if family == "phimoe":  # a sliding window its mask applies but its attention is not told of; MoE blocks
        return transformers.PhimoeConfig(
            num_key_value_heads=2, sliding_window=6, num_local_experts=2, router_jitter_noise=0.0,
            input_jitter_noise=0.0, **common,
        )  # fmt: skip
    if family == "mixtral":  # MoE with the router load-balancing loss in its loss (coefficient large enough to matter)
        return transformers.MixtralConfig(
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0,
            output_router_logits=True, router_aux_loss_coef=0.3, **common,
        )  # fmt: skip
    if family == "qwen2_moe":  # MoE with shared experts and the router load-balancing loss
        return transformers.Qwen2MoeConfig(
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, output_router_logits=True, router_aux_loss_coef=0.3, **common,
        )  # fmt: skip
    raise ValueError(family)


def sft_dataset(n: int, seed: int) -> list[dict[str, list[int]]]:
    """Examples of 10-40 tokens whose first 1-5 (prompt) tokens are masked with -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(10, 41, (1,), generator=g))
        prompt = int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def build_model(family: str, reference: bool) -> transformers.PreTrainedModel:
    """The model with seed 0. Stock sdpa honours packed position_ids only without a KV cache, so the reference turns
    it off; the CP model keeps the config as loaded."""
    config = tiny_config(family)
    if reference:
        config.use_cache = False
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def arguments(output_dir: str | None = None, **kwargs) -> dict:
    defaults = dict(
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=2,
        num_train_epochs=1,
        # SGD, as Adam's first steps are lr · g / |g|: the rounding of a gradient that cancels to ~0 would become an
        # O(lr) change of that weight. Gradients themselves are compared at every step.
        optim="sgd",
        learning_rate=0.5,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
    )
    return {**defaults, "output_dir": output_dir or tempfile.mkdtemp(), **kwargs}


class RecordingMixin:
    """Keeps what `training_step` returned on this rank, and the (reduced) gradients of every optimizer step."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.step_losses.append(loss.item())
        return loss


class GradientRecorder(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


class StockTrainer(RecordingMixin, transformers.Trainer):
    step_losses: list


class CPTrainer(RecordingMixin, transformers_cp.Trainer):
    step_losses: list


class MetricInputs:
    """`compute_metrics` that keeps the inputs the evaluation loop hands it (`include_for_metrics=["inputs"]`)."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, prediction: transformers.EvalPrediction) -> dict[str, float]:
        self.inputs.append(torch.as_tensor(prediction.inputs))
        return {"input_tokens": float((self.inputs[-1] != -100).sum())}


def train_and_record(trainer: transformers.Trainer, predict: bool = False) -> dict:
    """With `predict`, also the predictions of the eval set and the inputs that compute_metrics got in evaluate and
    predict."""
    trainer.step_losses = []
    recorder = GradientRecorder()
    trainer.add_callback(recorder)
    metric_inputs = MetricInputs()
    if predict:
        trainer.args.include_for_metrics = ["inputs"]
        trainer.compute_metrics = metric_inputs
    trainer.train()
    result = {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        "step_losses": trainer.step_losses,
        "eval_loss": trainer.evaluate()["eval_loss"],
        "grads": recorder.grads,
        "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
    }
    if predict:
        output = trainer.predict(trainer.eval_dataset)
        result["predictions"] = torch.as_tensor(output.predictions)
        result["label_ids"] = torch.as_tensor(output.label_ids)
        result["metric_inputs"] = metric_inputs.inputs
    return result


def run_stock(family: str, predict: bool = False, **kwargs) -> dict:
    trainer = StockTrainer(
        model=build_model(family, reference=True),
        args=transformers.TrainingArguments(**arguments(**kwargs)),
        data_collator=transformers.DataCollatorWithFlattening(),
        train_dataset=sft_dataset(13, 0),
        eval_dataset=sft_dataset(7, 1),
    )
    return train_and_record(trainer, predict)


def flattening_cp_trainer(family: str, args: transformers.TrainingArguments) -> CPTrainer:
    """transformers_cp's Trainer on the stock run's model and collator (DataCollatorWithFlattening): for runs with
    context_parallel_size=1, which must equal the stock Trainer."""
    return CPTrainer(
        model=build_model(family, reference=True),
        args=args,
        data_collator=transformers.DataCollatorWithFlattening(),
        train_dataset=sft_dataset(13, 0),
        eval_dataset=sft_dataset(7, 1),
    )


def cp_trainer(family: str, size: int, mode: str, ulysses_size: int | None = None, **kw) -> CPTrainer:
    args = transformers_cp.TrainingArguments(
        **arguments(
            context_parallel_size=size, context_parallel_mode=mode, context_parallel_ulysses_size=ulysses_size, **kw
        )
    )
    return CPTrainer(
        model=build_model(family, reference=False),
        args=args,
        train_dataset=sft_dataset(13, 0),
        eval_dataset=sft_dataset(7, 1),
    )


def run_cp(family: str, size: int, mode: str, ulysses_size: int | None = None, predict: bool = False, **kw) -> dict:
    return train_and_record(cp_trainer(family, size, mode, ulysses_size, **kw), predict)


def assert_same_run(actual: dict, expected: dict, name: str, dp_rank: int | None = None) -> None:
    """`actual` (a CP rank) equals `expected` (the stock run; `dp_rank` picks the stock rank's own step losses)."""
    assert len(actual["losses"]) == len(expected["losses"]) > 0, name
    assert_close(torch.tensor(actual["losses"]), torch.tensor(expected["losses"]), RTOL, f"{name} losses")
    assert_close(torch.tensor(actual["grad_norms"]), torch.tensor(expected["grad_norms"]), RTOL, f"{name} grad norms")
    steps = expected["step_losses"] if dp_rank is None else expected["step_losses"][dp_rank]
    assert_close(torch.tensor(actual["step_losses"]), torch.tensor(steps), RTOL, f"{name} per-rank step losses")
    assert_close(torch.tensor(actual["eval_loss"]), torch.tensor(expected["eval_loss"]), RTOL, f"{name} eval loss")
    assert len(actual["grads"]) == len(expected["grads"]), name
    for step, (grads, expected_grads) in enumerate(zip(actual["grads"], expected["grads"])):
        assert grads.keys() == expected_grads.keys(), name
        for key, value in expected_grads.items():
            assert_close(grads[key], value, RTOL, f"{name} step {step} gradient of {key}")
    for key, value in expected["weights"].items():
        assert_close(actual["weights"][key], value, RTOL, f"{name} weight {key}")
    if "predictions" in actual:
        assert actual["predictions"].shape == expected["predictions"].shape, name
        filled = expected["predictions"] != -100  # the Trainer pads rows of different lengths with -100
        assert torch.equal(actual["predictions"] != -100, filled), f"{name} prediction padding"
        assert_close(actual["predictions"][filled], expected["predictions"][filled], RTOL, f"{name} predictions")
        assert torch.equal(actual["label_ids"], expected["label_ids"]), f"{name} label_ids"
        assert len(actual["metric_inputs"]) == len(expected["metric_inputs"]) == 2, name  # evaluate, predict
        for got, want in zip(actual["metric_inputs"], expected["metric_inputs"]):
            assert torch.equal(got, want), f"{name} compute_metrics inputs"
