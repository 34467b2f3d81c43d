"""`context_parallel_balance="documents"`: every ring rank holds the same tokens and about the same causal work, the
ring skips steps that hold no pairs, and attention, the model and the Trainer stay exact (float32, rtol 1e-5)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from reference import assert_close, check_cp_attention
from trainer_cases import assert_same_run, build_model, run_cp, run_stock, sft_dataset

from transformers_cp import ContextParallelCollator, gather_sequence
from transformers_cp.balance import (
    SPLIT_SHARE,
    WORK_TOLERANCE,
    balanced_ranges,
    document_bounds,
    pairs,
    range_work,
)
from transformers_cp.config import ContextParallelConfig, ContextParallelConfigError
from transformers_cp.layout import Layout
from transformers_cp.mesh import build_mesh
from transformers_cp.modeling import apply_context_parallel
from transformers_cp.modes import MODES
from transformers_cp.plan import Documents, ring_plan

HEAD_DIM = 8
RTOL = 1e-5


def _mixes(seq: int, ring: int) -> dict[str, list[int]]:
    """Document lengths (a padding tail makes up the rest of the row)."""
    chunk = seq // (2 * ring)
    return {
        "one document": [seq],
        "one long + pad": [seq - 3],
        "many short": [5, 3, 7, 2, 6, 4, 8, 3, 5, 2, 7, 4] * (seq // 56),
        "one-token documents": [1] * (seq // 2) + [seq // 4],
        "long crossing every chunk": [chunk // 2, seq - chunk - 1, 1],
        "mixed": [1, 30, 5, 2, 41, 9][: max(1, seq // 24)],
        "two halves + ones": [seq // 2 - 1, 1, 1, seq // 2 - 1],
    }


def _row(lengths: list[int], seq: int) -> list[int]:
    return document_bounds(list(itertools.accumulate(lengths, initial=0)), seq)


def _lognormal(seq: int, rng: random.Random, median: int, top: int) -> list[int]:
    lengths = []
    while sum(lengths) < seq:
        lengths.append(max(1, min(top, int(rng.lognormvariate(math.log(median), 1.0)))))
    lengths[-1] -= sum(lengths) - seq
    return [n for n in lengths if n > 0]


# ---- the balance itself, on the host --------------------------------------------------------------------------------


def _check_ranges(bounds: list[int], seq: int, ring: int) -> list[int]:
    ranges = balanced_ranges(bounds, seq, ring)
    covered = sorted(r for rank in ranges for r in rank)
    assert covered[0][0] == 0 and covered[-1][1] == seq
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), "every token is held by exactly one rank"
    assert {sum(e - s for s, e in rank) for rank in ranges} == {seq // ring}, "every rank holds the same tokens"
    return [range_work(bounds, rank) for rank in ranges]


@pytest.mark.parametrize("ring", [2, 3, 4, 8])
def test_every_rank_gets_the_same_tokens_and_bounded_work(ring):
    """Stated bound: no rank's causal work is more than (1 + WORK_TOLERANCE)·W/R, or else than the bound with every
    cuttable document cut: W/R + the largest whole document's work (< W/(R·SPLIT_SHARE)) + 4·(tokens of the cut
    documents), where W/R is the mean; the cut documents' rounding costs at most a few tokens' worth of pairs each."""
    rng = random.Random(ring)
    seqs = [2 * ring * 12, 2 * ring * 128, 2 * ring * 3001]
    cases = [(seq, _row(lengths, seq)) for seq in seqs for lengths in _mixes(seq, ring).values()]
    cases += [(seq, _row(_lognormal(seq, rng, seq // 16, seq // 4), seq)) for seq in seqs for _ in range(4)]
    for seq, bounds in cases:
        work = _check_ranges(bounds, seq, ring)
        docs = list(zip(bounds, bounds[1:]))
        mean = sum(pairs(a, b, a) for a, b in docs) / ring
        cut = {(a, b) for a, b in docs if b - a >= 2 * ring and pairs(a, b, a) * SPLIT_SHARE > mean}
        whole = max((pairs(a, b, a) for a, b in docs if (a, b) not in cut), default=0)
        bound = max((1 + WORK_TOLERANCE) * mean, mean + whole + 4 * sum(b - a for a, b in cut))
        assert max(work) <= bound, (seq, ring, bounds, work, bound)


def _cut_documents(bounds: list[int], seq: int, ring: int) -> tuple[int, int]:
    """(documents the balance cuts into 2R chunks, documents the old rule cut: every cuttable one). A cut document
    meets 2R-1 of the ranges (chunks R-1 and R join on rank R-1); one filled in pieces meets at most one per rank."""
    ranges = [r for rank in balanced_ranges(bounds, seq, ring) for r in rank]
    docs = list(zip(bounds, bounds[1:]))
    mean = sum(pairs(a, b, a) for a, b in docs) / ring
    cut = sum(sum(s < b and a < e for s, e in ranges) >= 2 * ring - 1 for a, b in docs)
    cuttable = sum(b - a >= 2 * ring and pairs(a, b, a) * SPLIT_SHARE > mean for a, b in docs)
    return cut, cuttable


@pytest.mark.parametrize("ring", [2, 4, 8])
def test_realistic_rows_cut_few_documents(ring):
    """Lognormal SFT mixes (median 4k, up to 32k) and documents of 1k–32k in 128k rows: every row within
    WORK_TOLERANCE, with fewer documents cut than the old rule (every cuttable one) cut: at most a quarter of them
    over 2 ranks, half over 4; over 8 ranks (16k tokens each, one to three documents a rank, many longer than a
    rank's share) at most seven eighths."""
    rng = random.Random(ring)
    seq = 131072
    rows = [_lognormal(seq, rng, 4096, 32768) for _ in range(6)]
    for _ in range(4):
        uniform = []
        while sum(uniform) < seq:
            uniform.append(min(rng.randint(1024, 32768), seq - sum(uniform)))
        rows.append(uniform)
    cut = cuttable = 0
    for lengths in rows:
        bounds = _row(lengths, seq)
        work = _check_ranges(bounds, seq, ring)
        assert max(work) <= (1 + WORK_TOLERANCE) * sum(work) / ring, (lengths, work)
        row_cut, row_cuttable = _cut_documents(bounds, seq, ring)
        cut, cuttable = cut + row_cut, cuttable + row_cuttable
    assert cut <= {2: 1 / 4, 4: 1 / 2, 8: 7 / 8}[ring] * cuttable, (cut, cuttable)


@pytest.mark.parametrize("ring", [2, 4, 8])
def test_documents_that_fill_the_ranks_whole_are_never_cut(ring):
    """Equal documents, as many as a multiple of the ranks: each is cuttable (a large share of a rank's work), yet
    they go whole, every rank gets the same work exactly, and the ring never leaves step 0."""
    for per_rank in (1, 2, 3):
        seq = 256 * ring * per_rank
        bounds = _row([256] * (ring * per_rank), seq)
        work = _check_ranges(bounds, seq, ring)
        assert len(set(work)) == 1, work
        assert _cut_documents(bounds, seq, ring) == (0, ring * per_rank)
        docs = Documents(bounds, seq)
        for mode in ("zigzag", "contiguous"):
            policy = Layout(mode, ring, 1, "documents")
            for r in range(ring):
                assert [s for s, _ in ring_plan(docs, policy, r, None)] == [0], (ring, per_rank, mode)


@pytest.mark.parametrize("ring", [2, 4, 8])
def test_realistic_mixes_are_balanced_within_the_tolerance(ring):
    """Lognormal SFT mixes (median 4k, up to 32k) in a 128k row: the ring's time (the most loaded rank at each step,
    summed), and so the most loaded rank, within WORK_TOLERANCE of the mean (a document split in pieces meets its
    other pieces at a later step, which the balance counts); the zigzag layout is far off."""
    rng = random.Random(0)
    seq = 131072
    worst_zigzag = 1.0
    for _ in range(6):
        lengths = _lognormal(seq, rng, 4096, 32768)
        bounds = _row(lengths, seq)
        work = _check_ranges(bounds, seq, ring)
        mean = sum(work) / ring
        assert max(work) <= (1 + WORK_TOLERANCE) * mean, work
        docs = Documents(bounds, seq)
        policy = Layout("zigzag", ring, 1, "documents")
        per_step = [[0] * ring for _ in range(ring)]
        for r in range(ring):
            for s, blocks in ring_plan(docs, policy, r, None):
                per_step[s][r] = sum(_block_pairs(b) for b in blocks)
        assert sum(map(sum, per_step)) == sum(work)
        assert sum(max(step) for step in per_step) <= (1 + WORK_TOLERANCE) * mean, per_step
        zigzag = Layout("zigzag", ring, 1)
        worst_zigzag = max(worst_zigzag, max(range_work(bounds, zigzag.ranges(seq, r)) for r in range(ring)) / mean)
    assert worst_zigzag > 1.1  # what the balance is for


def _block_pairs(block) -> int:
    """Visible pairs of one planned kernel call (no window)."""
    seg = block.seg
    total = 0
    for i in range(len(seg.cu_q) - 1):
        lq, lk = seg.cu_q[i + 1] - seg.cu_q[i], seg.cu_k[i + 1] - seg.cu_k[i]
        total += lq * (lq + 1) // 2 if seg.causal else lq * lk
    return total


def test_rows_of_short_documents_never_leave_step_zero():
    """Documents that each fit whole on one rank (none is over 1/SPLIT_SHARE of a rank's work, and they fill the
    ranks exactly): the plan has only the rank's own KV, so nothing travels. (Where whole documents cannot fill every
    rank to the same token count, one is split, and its pieces meet at a later step.)"""
    seq, ring = 4096, 4
    docs = Documents(_row([16] * 256, seq), seq)
    for mode in ("zigzag", "contiguous"):
        policy = Layout(mode, ring, 1, "documents")
        for r in range(ring):
            assert [s for s, _ in ring_plan(docs, policy, r, None)] == [0]
    # the token layout cuts documents at chunk edges, so step 1 holds pairs; the later contiguous steps do not
    docs = Documents(_row([24] * 170, seq), seq)
    contiguous = Layout("contiguous", ring, 1)
    for r in range(ring):
        assert [s for s, _ in ring_plan(docs, contiguous, r, None)] == [0, 1]


def test_a_single_document_row_keeps_the_zigzag_work():
    """One document filling the row is cut into the zigzag's own chunks."""
    seq, ring = 64, 4
    zigzag = Layout("zigzag", ring, 1)
    balanced = Layout("zigzag", ring, 1, "documents").for_row([0, seq], seq)
    for r in range(ring):
        assert torch.equal(balanced.index(seq, r), zigzag.index(seq, r))


def test_bad_balance_settings_name_the_setting():
    with pytest.raises(ContextParallelConfigError, match="context_parallel_balance='bytes' is unknown"):
        ContextParallelConfig(balance="bytes")
    taking = [name for name, mode in MODES.items() if mode.balances_documents]
    assert taking == ["ring", "zigzag", "llama3"]  # the mode registry says which modes take it
    for name in MODES:
        if name in taking:
            assert ContextParallelConfig(mode=name, balance="documents").balance == "documents"
            continue
        with pytest.raises(ContextParallelConfigError, match="context_parallel_balance='documents' balances"):
            ContextParallelConfig(mode=name, balance="documents")


# ---- exactness, gloo ------------------------------------------------------------------------------------------------


def _attention_worker(rank, world):
    for mode in ("ring", "zigzag", "llama3"):
        mesh = build_mesh(ContextParallelConfig(size=world, mode=mode, balance="documents"), "cpu")
        seq = 24 * world
        mha, gqa = (2 * world, 2 * world), (2 * world, max(1, world // 2))
        for (name, lengths), (heads, window) in itertools.product(_mixes(seq, world).items(), ((mha, None), (gqa, 7))):
            bounds = _row(lengths, seq)
            check_cp_attention(mesh, seq, bounds, heads, window, f"{mode} {name} heads={heads} window={window}")
    if world == 4:  # the token zigzag, with one document crossing from chunk 4 (rank 3) into chunk 5 (rank 2) only
        mesh = build_mesh(ContextParallelConfig(size=world, mode="zigzag"), "cpu")
        bounds = [0, 12, 24, 36, 48, 54, 66, 72, 84, 96]
        assert [s for s, _ in ring_plan(Documents(bounds, 96), mesh.layout, mesh.ring_rank, None)] == [0, 3]
        check_cp_attention(mesh, 96, bounds, (8, 2), None, "zigzag, steps 1 and 2 jumped")


@pytest.mark.parametrize("world", [2, 4])
def test_balanced_attention_matches_dense_attention(world):
    run_distributed(_attention_worker, world)


def _model_worker(rank, world):
    """The collator shards by documents; logits (gathered) and parameter gradients equal the stock model's."""
    import transformers

    features = sft_dataset(6, 5) + [{"input_ids": [3], "labels": [3]}] + sft_dataset(2, 6)
    reference = build_model("llama", reference=True)
    batch = transformers.DataCollatorWithFlattening()(features, return_tensors="pt")
    out = reference(**batch)
    out.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    for mode in ("zigzag", "llama3", "ring"):
        mesh = build_mesh(ContextParallelConfig(size=world, mode=mode, balance="documents"), "cpu")
        model = apply_context_parallel(build_model("llama", reference=False), mesh.config, mesh=mesh)
        shard = ContextParallelCollator(mesh)(features)
        with pytest.raises(ValueError, match="run no forward yet"):  # no row layout to gather with
            gather_sequence(shard["shift_labels"], mesh)
        early = gather_sequence(shard["shift_labels"], mesh, cu_seq_lens_q=shard["cu_seq_lens_q"])
        with pytest.raises(ValueError, match="is not this row's"):  # another row's boundaries, refused alike
            gather_sequence(shard["shift_labels"], mesh, cu_seq_lens_q=torch.tensor([0, 10**6]))
        inputs = {k: shard[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")}
        tokens = out.logits.shape[1]
        logits = gather_sequence(model(**inputs).logits, mesh)[:, :tokens]
        assert_close(logits, out.logits.detach(), RTOL, f"{mode} logits")
        targets = gather_sequence(shard["shift_labels"], mesh)[0, :tokens]
        assert torch.equal(early[0, :tokens], targets), f"{mode}: labels gathered before the forward"
        torch.nn.functional.cross_entropy(logits[0], targets).backward()
        for n, p in model.named_parameters():
            dist.all_reduce(p.grad, group=mesh.cp_group)
            assert_close(p.grad, ref_grads[n], RTOL, f"{mode} grad {n}")
        # another row's labels, gathered by its own boundaries after the first row's forward
        other = ContextParallelCollator(mesh)(sft_dataset(3, 9))
        early = gather_sequence(other["shift_labels"], mesh, cu_seq_lens_q=other["cu_seq_lens_q"])
        with torch.no_grad():
            model(**{k: other[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")})
        assert torch.equal(early, gather_sequence(other["shift_labels"], mesh)), f"{mode}: another row's labels"
        with pytest.raises(ValueError, match="needs the row's cu_seq_lens_q"):
            model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])


def test_balanced_model_matches_the_stock_model():
    run_distributed(_model_worker, 2)


def _trainer_worker(rank, world, expected):
    # llama3 (its gathered sent rows); the ring's steps are covered above, through the model and alone
    actual = run_cp("qwen2", world, "llama3", predict=True, context_parallel_balance="documents")
    assert_same_run(actual, expected, "llama3 balanced")


def test_balanced_trainer_matches_the_stock_trainer():
    run_distributed(_trainer_worker, 2, run_stock("qwen2", predict=True))
