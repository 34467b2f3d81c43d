"""Process groups for context parallelism as a named DeviceMesh.

The mesh is (dp, cp) with CP ranks adjacent: torchrun numbers ranks node by node, so a CP group stays inside a
node (NVLink) whenever its size divides the GPUs per node. For `hybrid` the cp dimension is (ring, ulysses) with the
Ulysses ranks innermost, because the all-to-all moves the most bytes.
"""

from __future__ import annotations

import atexit
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ContextParallelConfig, ContextParallelConfigError
from .layout import Layout


@dataclass
class ContextParallelMesh:
    """The groups and coordinates one rank needs. Groups are `None` where their dimension has size 1."""

    config: ContextParallelConfig  # resolved: `size` is set
    layout: Layout
    device_mesh: object | None
    cp_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    cp_rank: int
    dp_rank: int
    dp_size: int
    row_layout: Layout | None = None  # the layout of the row of the last forward (`modeling`), under balance=documents

    @property
    def current_layout(self) -> Layout:
        """The layout the row of the last forward was sharded with (the mesh's own, unless it follows documents)."""
        return self.row_layout or self.layout

    @property
    def cp_size(self) -> int:
        return self.config.size

    @property
    def ring_rank(self) -> int:
        return self.cp_rank // self.layout.ulysses

    @property
    def ulysses_rank(self) -> int:
        return self.cp_rank % self.layout.ulysses


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(device_type: str | None = None) -> None:
    """Start the default process group from torchrun's environment if nobody has (nccl on GPU, gloo on CPU)."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    device_type = device_type or default_device_type()
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def job_config(config: ContextParallelConfig) -> ContextParallelConfig:
    """`config` resolved against this job's processes (the default group's size; 1 without one).

    Every rank computes the same answer from its own state, so a size that does not fit raises the same error on all
    ranks before any group is made or any collective runs."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        return config.resolved(world)
    except ContextParallelConfigError as error:
        if dist.is_initialized():
            raise
        if "WORLD_SIZE" not in os.environ:
            hint = "WORLD_SIZE is not set: launch with torchrun or accelerate launch"
        else:
            hint = "no process group is started: call torch.distributed.init_process_group first"
        raise ContextParallelConfigError(f"{error} ({hint})") from None


def node_size() -> int | None:
    """Processes per node, from torchrun / accelerate (LOCAL_WORLD_SIZE) or the DeepSpeed launcher (LOCAL_SIZE)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE"))
    return int(value) if value else None


def check_node_placement(cp_size: int, world: int, per_node: int | None) -> None:
    """Warn when a CP group would straddle a node boundary without spanning whole nodes.

    Ranks are numbered node by node (rank = node · per_node + local rank), and CP ranks are adjacent, so the CP
    groups are [0, c), [c, 2c), ...: inside one node when c divides the processes per node, whole nodes when per_node
    divides c. Otherwise some group's ring or all-to-all crosses the slow inter-node link although a placement
    within nodes existed. Results stay exact; only speed suffers, hence a warning.
    """
    if per_node is None or per_node >= world or cp_size == 1:
        return
    if per_node % cp_size and cp_size % per_node:
        warnings.warn(
            f"context_parallel_size={cp_size} neither divides nor is a multiple of the {per_node} processes per node, "
            f"so some context-parallel groups span two nodes; choose a divisor of {per_node} (or a multiple of it) "
            "to keep each group's sequence traffic inside nodes.",
            stacklevel=3,
        )


def build_mesh(config: ContextParallelConfig, device_type: str | None = None) -> ContextParallelMesh:
    """Build the (dp, cp) mesh for `config` over every process of the job.

    Every rank validates the config against the world size before any collective is issued, so a bad size raises
    the same clear error on all ranks instead of hanging in group creation.
    """
    device_type = device_type or default_device_type()
    config = job_config(config).without_memory_savings()  # the memory savings are the model's, not the mesh's
    layout = Layout.from_config(config)
    world = dist.get_world_size() if dist.is_initialized() else 1
    cp, dp = config.size, world // config.size
    if world == 1:
        return ContextParallelMesh(config, layout, None, None, None, None, None, 0, 0, 1)
    check_node_placement(cp, world, node_size())
    settle_gloo_workers_at_exit()

    from torch.distributed.device_mesh import init_device_mesh

    ring, uly = layout.ring, layout.ulysses
    mesh = init_device_mesh(device_type, (dp, ring, uly), mesh_dim_names=("dp", "cp_ring", "cp_ulysses"))
    cp_mesh = mesh["cp_ring", "cp_ulysses"]._flatten("cp")
    coords = mesh.get_coordinate()
    cp_rank = coords[1] * uly + coords[2]
    return ContextParallelMesh(
        config=config,
        layout=layout,
        device_mesh=mesh,
        cp_group=cp_mesh.get_group() if cp > 1 else None,
        ring_group=mesh.get_group("cp_ring") if ring > 1 else None,
        ulysses_group=mesh.get_group("cp_ulysses") if uly > 1 else None,
        dp_group=mesh.get_group("dp") if dp > 1 else None,
        cp_rank=cp_rank,
        dp_rank=coords[0],
        dp_size=dp,
    )


_GLOO_WORKER = "pt_gloo_runloop"  # the name torch gives the worker threads of a gloo process group


def _gloo_workers_busy(tasks: str) -> bool:
    """Whether a gloo worker thread of this process is running or waiting to run (Linux: /proc)."""
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/comm") as comm:
                if comm.read().strip() != _GLOO_WORKER:
                    continue
            with open(f"{tasks}/{tid}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except OSError:  # the thread ended meanwhile
            continue
        if state == "R":
            return True
    return False


def _settle_gloo_workers(timeout: float = 2.0, poll: float = 0.002) -> None:
    """Give gloo's worker threads the GIL until they are idle, before the interpreter finalises.

    A gloo worker thread completes a collective, wakes the caller, and only then drops its reference to the work and
    its tensors. A tensor that Python also knew needs the GIL to be released; once the main thread has started
    finalising the interpreter, a thread that asks for the GIL is ended with pthread_exit, whose unwinding through a
    C++ destructor aborts the process ("terminate called without an active exception"). A script that ends right
    after its last collective (a Trainer's last all-gather of its flos, say) loses that race now and then. Here,
    while the interpreter is still whole, the main thread sleeps (releasing the GIL) until no worker has been
    running or runnable at two polls in a row: a worker waiting for the GIL gets it during the sleep, and one that
    the OS has not scheduled yet shows as runnable. No collective is issued, so a failing job cannot hang here.
    """
    tasks = f"/proc/{os.getpid()}/task"
    if not os.path.isdir(tasks):
        return
    deadline, quiet = time.monotonic() + timeout, 0
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(poll)
        quiet = 0 if _gloo_workers_busy(tasks) else quiet + 1


_SETTLE_REGISTERED = False


def settle_gloo_workers_at_exit() -> None:
    """Register `_settle_gloo_workers` to run at interpreter exit (once per process)."""
    global _SETTLE_REGISTERED
    if not _SETTLE_REGISTERED:
        atexit.register(_settle_gloo_workers)
        _SETTLE_REGISTERED = True
