"""Run a function on N gloo processes from pytest, with a hard timeout so that a hang fails instead of blocking."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from typing import NoReturn

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, store: str, fn, args, errors) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist

    faulthandler.enable()  # a native abort prints the Python stack of every thread

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    # A file rendezvous cannot collide with another test's port; the env vars serve libraries that read them.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    leave()  # every assertion has run


def leave() -> NoReturn:
    """End a finished test process once every rank is here, skipping the gloo teardown and interpreter finalisation.

    A gloo process group's teardown has, rarely (about 1 run in 50 under load, torch 2.13 CPU), aborted a finished
    rank with "terminate called without an active exception", even after `destroy_process_group()` (seen once in CI
    in the torchrun job of the determinism test), which would fail a test whose checks all passed; see
    docs/reliability.md."""
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world: int, *args, timeout: float = 300.0) -> None:
    """Spawn `world` processes running fn(rank, world, *args); re-raise the first failure with its traceback."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    store = tempfile.mktemp(prefix="cp_test_store_")
    procs = mp.start_processes(
        _entry, args=(world, _free_port(), store, fn, args, errors), nprocs=world, join=False, start_method="spawn"
    )
    try:
        _wait(procs, errors, timeout)
    finally:
        if os.path.exists(store):
            os.remove(store)


def _wait(procs, errors, timeout: float) -> None:
    """Join the processes; a failing rank's own traceback wins over the aborts it causes in its peers."""
    deadline = time.monotonic() + timeout
    try:
        while not procs.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                for p in procs.processes:
                    p.kill()
                raise TimeoutError(f"distributed test did not finish within {timeout:.0f}s (hang)")
    except Exception as exc:
        if not errors.empty():
            rank, tb = errors.get()
            raise AssertionError(f"rank {rank} failed:\n{tb}") from exc
        raise
    if not errors.empty():
        rank, tb = errors.get()
        raise AssertionError(f"rank {rank} failed:\n{tb}")
