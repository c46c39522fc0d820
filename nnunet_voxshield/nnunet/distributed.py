"""`-num_gpus N`: the bilevel loop in N torch.distributed processes, each owning a shard of the cases.

Like `nnUNetv2_train -num_gpus N`, the processes are spawned on this machine and the surrogate trains with DDP
(NCCL on CUDA, one GPU per rank). Unlike stock nnU-Net, CPU processes are allowed too (gloo backend), which is
how the tests run it. For several nodes, start one process per GPU with torchrun (it sets RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_ADDR/PORT); `nnUNetv2_voxshield_protect` then joins that group instead of spawning.
"""
import os
import socket
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shard(items: list) -> list:
    """This rank's share: every world_size-th item, so shards differ in length by at most one."""
    return items[rank()::world_size()]


def all_gather(obj) -> list:
    """One object per rank, in rank order (a plain list of `obj` without torch.distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_lead(obj) -> list | None:
    """One object per rank, in rank order, on rank 0 only (None elsewhere): for what only rank 0 writes."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_device(device: torch.device) -> torch.device:
    """One GPU per local rank on CUDA; every rank shares the CPU otherwise."""
    if device.type != "cuda" or not dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


@contextmanager
def process_group(device: torch.device, rank_: int | None = None, world: int | None = None):
    """Join a process group (NCCL for CUDA, gloo otherwise) for the duration of the block."""
    kwargs = {} if rank_ is None else {"rank": rank_, "world_size": world}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn(fn, n: int, device: torch.device, *args) -> None:
    """Run fn(*args) in n local processes that form one process group, as nnUNetv2_train -num_gpus does."""
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    mp.spawn(_run_rank, args=(n, device, fn, args), nprocs=n, join=True)


def _run_rank(rank_: int, n: int, device: torch.device, fn, args) -> None:
    with process_group(device, rank_, n):
        fn(*args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_in_sync(module: torch.nn.Module) -> None:
    """DDP keeps the replicas bit-identical; a difference means a rank skipped or repeated a step."""
    sums = all_gather(float(sum(p.detach().double().sum() for p in module.parameters())))
    if len(set(sums)) > 1:
        raise RuntimeError(f"surrogate replicas diverged across ranks (parameter sums {sums})")
