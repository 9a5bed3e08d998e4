"""Distributed helpers in one place: everything else calls these, so one CPU process works too.

`rank()` and `world_size()` are 0 and 1 when torch.distributed is not initialised; `all_gather`
is the identity on one process. Launch many processes with torchrun, which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT:

    torchrun --nproc_per_node=2 -m train.pretrain ...                       # one machine
    torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=HOST:29400 ... -m train.pretrain ...
"""
from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); False when not launched by it."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1 or is_initialized():
        return is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch_dist.init_process_group(backend=backend)
    return True


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; anything else as torch.device(name)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_device(name: str = "auto") -> torch.device:
    """This process's device (`resolve_device`), after which it joins torchrun's process group when
    launched by it (`init_from_env`). On CUDA the device gets an index and is made current: the GPU
    of LOCAL_RANK under torchrun or when none is named ("cuda"), else the one named ("cuda:1")."""
    device = resolve_device(name)
    if device.type == "cuda":
        if device.index is None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    init_from_env(device)
    return device


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (no gradient); the identity on one process."""
    if not is_initialized() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    torch_dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BN running statistics) over ranks, in place.

    DDP keeps parameters identical; BN running statistics are per rank unless SyncBN (CUDA) is
    used. Averaging them before a checkpoint gives every rank, and the saved model, the same ones.
    """
    if not is_initialized() or world_size() == 1:
        return
    for b in module.buffers():
        if b.is_floating_point():
            torch_dist.all_reduce(b)
            b.div_(world_size())


def destroy() -> None:
    if is_initialized():
        torch_dist.destroy_process_group()


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """`x` of rank `src` on every rank (a copy); `x` itself on one process."""
    if not is_initialized() or world_size() == 1:
        return x
    y = x.detach().clone().contiguous()
    torch_dist.broadcast(y, src=src)
    return y


@torch.no_grad()
def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite every tensor in place with rank `src`'s (weights after a resume); no-op on one process."""
    if not is_initialized() or world_size() == 1:
        return
    for t in tensors:
        torch_dist.broadcast(t, src=src)


def all_gather_object(obj) -> list:
    """`obj` of every rank, in rank order (picklable objects: RNG states); `[obj]` on one process."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out
