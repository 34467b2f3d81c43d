"""`ContextParallelCollator`: packs a batch of examples into one row, as `DataCollatorWithFlattening` does, and keeps
this rank's shard of it (with the row's checksum, see `sharding.py`).

It wraps the user's collator when there is one: a flattening collator's row is used as is, with the documents its
position_ids, cu_seq_lens or seq_idx mark; a padding collator's pads are removed (by its attention_mask) before
packing. Examples that carry their own position_ids (a dataset packed offline: they restart inside an example) keep
them, so their documents stay apart, as in the stock Trainer, whose model finds them in the position_ids. It holds only
the layout and the CP rank, so it pickles into dataloader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import DataCollatorWithFlattening

from .mesh import ContextParallelMesh
from .sharding import DOCUMENT_MARKERS, EMPTY_BATCH, BatchError, build_shard, pack_row


class ContextParallelCollator:
    """Examples -> this rank's shard of their packed row (input_ids, position_ids, labels, shift_labels,
    cu_seq_lens_q).

    Args:
        mesh: the CP mesh (`build_mesh`, or `context_parallel_mesh(model)`); only its layout and CP rank are kept.
        collator: the user's collator, if any: `DataCollatorWithFlattening`, or one that pads (its `attention_mask`
            tells the pads, which are removed) such as `DataCollatorWithPadding` or
            `DataCollatorForLanguageModeling(mlm=False)`. Without one, examples need `input_ids` (and may have
            `labels`, e.g. -100 on prompt tokens).
        pad_token_id: the token that pads the row to the layout's multiple (it has no targets and attends only to
            itself, so its value does not change the loss).
    """

    def __init__(self, mesh: ContextParallelMesh, collator: Callable | None = None, pad_token_id: int = 0) -> None:
        self.layout = mesh.layout
        self.cp_rank = mesh.cp_rank
        self.collator = collator
        self.pad_token_id = pad_token_id
        self._flatten = DataCollatorWithFlattening(return_tensors="pt")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """This rank's shard; a batch whose data cannot be packed gives a stand-in shard whose forward raises the
        problem on every rank (`sharding.build_shard`)."""
        return build_shard(lambda: self._row(features), self.layout, self.cp_rank, self.pad_token_id)

    def _row(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        # An empty example adds no token and no target; DataCollatorWithFlattening would still add a label for it
        # (misaligning the row's labels), so it is dropped here, before any collator sees it.
        kept = [(i, f) for i, f in enumerate(features) if len(f["input_ids"]) > 0]
        if not kept:  # raised here: the flattening collators cannot take an empty list
            raise BatchError(EMPTY_BATCH)
        for i, feature in kept:
            labels = feature.get("labels")
            # Checked per example: flattening joins them, so a label too many in one example and one too few in the
            # next would give a row of the right length whose targets are shifted against their tokens.
            if labels is not None and hasattr(labels, "__len__") and len(labels) != len(feature["input_ids"]):
                raise BatchError(
                    f"example {i} of the batch has {len(labels)} labels for {len(feature['input_ids'])} input_ids; "
                    "every example needs one label per token (-100 where there is no target)."
                )
        return pack_row(self.flatten([f for _, f in kept]), self.layout.multiple, self.pad_token_id)

    def flatten(self, features: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
        """The batch as one (1, T) row with its documents marked: position_ids restarting per example, or per
        document where an example carries its own position_ids."""
        if self.collator is None:
            return self._concatenate(features)
        batch = self.collator(features)
        input_ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
        if mask is None and input_ids.shape[0] == 1 and any(batch.get(k) is not None for k in DOCUMENT_MARKERS):
            return batch  # already flattened, its documents marked
        examples = []
        for i in range(input_ids.shape[0]):
            keep = torch.as_tensor(mask[i]).bool() if mask is not None else slice(None)
            example = {"input_ids": input_ids[i][keep]}
            for key in ("labels", "position_ids"):
                if batch.get(key) is not None:
                    example[key] = torch.as_tensor(batch[key][i])[keep]
            examples.append(example)
        return self._concatenate(examples)

    def _concatenate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Examples -> one row, as DataCollatorWithFlattening makes it (the first label of each example is -100, so
        no target crosses from one example into the next), keeping the position_ids of examples that have them.
        Without labels, pack_row makes them, with no target at any document's first token."""
        row = self._flatten(examples)
        if not any("labels" in e for e in examples):
            del row["labels"]
        if any(e.get("position_ids") is not None for e in examples):
            positions = []
            for e in examples:
                n = len(e["input_ids"])
                own = e.get("position_ids")
                own = torch.arange(n) if own is None else torch.as_tensor(own).reshape(-1)
                if own.numel() != n:
                    raise BatchError(
                        f"an example has {own.numel()} position_ids for {n} input_ids; give every example one "
                        "position id per token (restarting at 0 where a document packed into it starts)."
                    )
                positions.append(own)
            row["position_ids"] = torch.cat(positions)[None].to(row["input_ids"].dtype)
        return row
