"""MiniMax's lightning attention and RecurrentGemma's RG-LRU block under CP by state passing (`mixers_linear`: each
rank runs the stock mixer on its own tokens, the convolution's look-back and the recurrence's state cross ranks) equal
each document run alone through the stock model: logits and every parameter gradient (fp32, relative 1e-5), in
zigzag, ring, llama3, ulysses (and hybrid 2 × 2 on 4 ranks) and the `documents` balance of zigzag and ring, on 2 and 4
gloo ranks, on rows whose documents are of one token, shorter than a chunk, longer than a shard (spanning 3 and more
chunks), and start one token before a chunk edge (`test_hybrid_state.ROWS`). Each case also checks that the
state-passing path ran in every mixer call. `transformers_cp.Trainer` (gradient accumulation, every layer checkpointed)
equals the stock Trainer on one right-padded document per row. One distributed job per world size loops over every
case.
"""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from reference import per_document
from test_hybrid import _assert_same_training, _trainer_run, assert_refused, compare_row, packed_row
from test_hybrid_state import BALANCED, MODES, ROWS, build

from transformers_cp import (
    ContextParallelConfig,
    apply_context_parallel,
    build_mesh,
    delta_rule,
)
from transformers_cp.mixers import find_mixers
from transformers_cp.mixers_linear import CLASSES, LightningMixer, RecurrentBlockMixer, fits

RTOL = 1e-5
FAMILIES = {"minimax": "MiniMaxLightningAttention", "recurrent_gemma": "RecurrentGemmaRecurrentBlock"}


class _ran:
    """Counts the calls of the state-passing step of each form (the lightning correction, the RG-LRU's CP scan)."""

    def __enter__(self) -> _ran:
        self.calls, self.saved = 0, []
        for form, step in ((LightningMixer, "_correction"), (RecurrentBlockMixer, "_scan")):
            original = getattr(form, step)

            def counted(*args, original=original, **kwargs):
                self.calls += 1
                return original(*args, **kwargs)

            self.saved.append((form, step, original))
            setattr(form, step, counted)
        return self

    def __exit__(self, *exc) -> None:
        for form, step, original in self.saved:
            setattr(form, step, original)


def _worker(rank: int, world: int) -> None:
    configs = [
        ContextParallelConfig(size=world, mode=m, ulysses_size=2 if m == "hybrid" else None) for m in MODES[world]
    ]
    configs += [ContextParallelConfig(size=world, mode=m, balance="documents") for m in BALANCED]
    meshes = [build_mesh(c, "cpu") for c in configs]
    for family, mixer in FAMILIES.items():
        model = build(family, torch.float32)
        layers = sum(type(m).__name__ == mixer for m in model.modules())
        for seed, lengths in enumerate(ROWS):
            reference = per_document(model, packed_row(lengths, seed)[0], lengths)
            for mesh in meshes:
                name = f"{family} {mesh.config.mode} ({mesh.config.balance}) on {world} ranks, {lengths}"
                with _ran() as ran:
                    compare_row(model, mesh, lengths, seed, reference, name, CLASSES[mixer])
                assert ran.calls == layers > 0, f"{name}: the state-passing path ran {ran.calls} times"
    if world == 2:
        _refuses_a_forward_that_skips_the_state(meshes[0])


def _refuses_a_forward_that_skips_the_state(mesh) -> None:
    """A mixer forward that does not reach the submodules the state passing hooks (another transformers version's) is
    refused on every rank, naming the way out, instead of running without state passing."""
    for family in FAMILIES:
        model = apply_context_parallel(build(family, torch.float32), mesh.config, mesh=mesh)
        mixer = next(m for _, m in find_mixers(model))
        hidden = mixer.forward.hidden  # the name of its input
        mixer.forward.original = lambda hidden=hidden, **kwargs: (kwargs[hidden], None)  # reaches none of them
        assert_refused(model, mesh)


def test_gathered_path_when_switched_off(monkeypatch):
    """`delta_rule.USE_STATE = False` keeps the gathered form for these mixers too."""
    for family in FAMILIES:
        module = next(m for _, m in find_mixers(build(family, torch.float32)))
        assert fits(module)
        monkeypatch.setattr(delta_rule, "USE_STATE", False)
        assert not fits(module)
        monkeypatch.undo()


@pytest.mark.parametrize("world", [2, 4])
def test_state_passing_equals_each_document_alone(world):
    run_distributed(_worker, world, timeout=900)


TRAINER_RUNS = {"minimax": "zigzag", "recurrent_gemma": "ring"}


def _trainer_worker(rank: int, world: int, expected: dict) -> None:
    for family, mode in TRAINER_RUNS.items():
        # recomputation runs each mixer again in backward, with its hooks and collectives, in the same order on every rank
        run = _trainer_run(world, mode, family, gradient_checkpointing=True)
        _assert_same_training(run, expected[family], f"{family} Trainer {mode}, gradient checkpointing")


def test_trainer_gradient_accumulation():
    """transformers_cp.Trainer (gradient accumulation 2, every layer checkpointed) equals the stock Trainer on one
    right-padded document per row (the mixers do not see the padding after a document)."""
    expected = {family: _trainer_run(1, family=family) for family in TRAINER_RUNS}
    run_distributed(_trainer_worker, 2, expected, timeout=900)
