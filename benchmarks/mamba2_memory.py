"""Activation memory of the Nemotron-H-shaped 1.5B decoder of benchmarks/hybrid.py on transformers' torch Mamba2 path,
without a GPU: one forward and backward (every layer checkpointed, bf16) on meta tensors, every op's output recorded
with a dispatch mode (the peak of the bytes alive and the largest tensor). `stock`: the model as it runs on one GPU;
`cp`: this rank's share of a CP row as `mixers_mamba2` runs it (rank 0 of 2, one document; its gathers stand in by
concatenation), the chunk scan in pieces. The LM head and loss are left out (transformers_cp chunks them), and
attention has a stand-in of flash attention's linear memory. Prints JSON lines.

    python benchmarks/mamba2_memory.py --modes stock,cp --seqs 8192,32768
"""

from __future__ import annotations

import argparse
import json
import weakref

import torch
import transformers
from hybrid import nemotron_h
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from transformers_cp import ContextParallelConfig, mixers_mamba2
from transformers_cp.layout import Layout
from transformers_cp.mesh import ContextParallelMesh
from transformers_cp.mixers import MixerDocuments
from transformers_cp.plan import Documents

WORLD = 2


class Recorder(TorchDispatchMode):
    """The peak of the bytes alive in storages that ops create while active, and the largest such storage."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[int, list[int]] = {}  # storage -> [bytes, tensors holding it]
        self.now = self.peak = 0
        self.largest: tuple[int, str, tuple] = (0, "", ())

    def _release(self, key: int) -> None:
        entry = self.alive[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.alive[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.alive:
                    self.alive[key] = [storage.nbytes(), 0]
                    self.now += storage.nbytes()
                    self.largest = max(self.largest, (storage.nbytes(), str(func), tuple(t.shape)))
                self.alive[key][1] += 1
                weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.now)
        return out


class _Gather(torch.autograd.Function):
    """All-gather's shapes on one process: WORLD copies of this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        return torch.cat([x] * WORLD)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.unflatten(0, (WORLD, -1)).sum(0), None


def _stand_in_attention(module, query, key, value, attention_mask, **kwargs):
    return (query * 1).transpose(1, 2).contiguous(), None


def measure(mode: str, seq: int) -> dict:
    transformers.AttentionInterface.register("stand_in", _stand_in_attention)
    config = nemotron_h(False)
    config._attn_implementation = "stand_in"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    local = seq // WORLD if mode == "cp" else seq
    if mode == "cp":
        mixers_mamba2.AllGather = _Gather
        cp = ContextParallelConfig(size=WORLD, mode="ulysses")
        mesh = ContextParallelMesh(cp, Layout.from_config(cp), None, None, None, None, None, 0, 0, 1)
        documents = MixerDocuments()
        documents.current = Documents([0, seq], seq)
        for module in [m for m in model.modules() if type(m).__name__ in mixers_mamba2.CLASSES]:
            mixer = mixers_mamba2.StatePassingMixer(module, mesh, documents)
            module.forward = mixer
            mixer.hooks()
    hidden = torch.empty(1, local, config.hidden_size, device="meta", dtype=torch.bfloat16, requires_grad=True)
    position_ids = torch.arange(local, device="meta")[None]
    with Recorder() as recorder:
        out = model.model(inputs_embeds=hidden, position_ids=position_ids).last_hidden_state
        out.float().sum().backward()
    size, op, shape = recorder.largest
    return dict(transformers=transformers.__version__, mode=mode, seq=seq, local_tokens=local,
                peak_gib=round(recorder.peak / 2**30, 2), kib_per_local_token=round(recorder.peak / local / 2**10),
                largest_gib=round(size / 2**30, 2), largest=f"{op} {list(shape)}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="stock,cp")
    p.add_argument("--seqs", default="8192,32768")
    a = p.parse_args()
    import transformers.masking_utils as masking  # packed-row detection reads values, which meta tensors lack

    masking.find_packed_sequence_indices = lambda *args, **kwargs: None
    for mode in a.modes.split(","):
        for seq in map(int, a.seqs.split(",")):
            print(json.dumps(measure(mode, seq)), flush=True)


if __name__ == "__main__":
    main()
