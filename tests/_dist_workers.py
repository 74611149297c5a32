"""Module-level worker functions for the multi-process tests (spawned processes import them by name)."""
import os

import torch
import torch.distributed as dist


def all_reduce_scaled(rank, world_size, x):
    t = torch.tensor([x * (rank + 1)], dtype=torch.float64)
    dist.all_reduce(t)
    return {"rank": rank, "world": world_size, "sum": t, "threads": torch.get_num_threads()}


def raise_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("malformed bucket from rank 1")
    dist.barrier()
    return rank


def die_on_rank0(rank, world_size):
    if rank == 0:
        os._exit(3)
    dist.barrier()
    return rank
