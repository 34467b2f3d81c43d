"""One process of the two-"node" job of test_engines.py, launched by torchrun: trains with context_parallel_size=2
and writes its node, process groups and run record to the folder given as the argument."""

from __future__ import annotations

import json
import os
import sys

import torch
from distributed import leave
from engine_cases import run_engine

out_dir = sys.argv[1]
rank = int(os.environ["RANK"])
record = run_engine("ddp", 2, os.path.join(out_dir, "train"))
with open(os.path.join(out_dir, f"groups_{rank}.json"), "w") as f:
    json.dump({"node": int(os.environ["GROUP_RANK"]), **record.pop("groups")}, f)
torch.save(record, os.path.join(out_dir, f"run_{rank}.pt"))
leave()
