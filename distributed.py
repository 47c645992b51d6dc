"""The process group of train.py and eval_multires.py: joining torchrun's group (or running as one
plain process), which rank this is, printing on rank 0, and the collectives every rank calls
alike. Without a process group every function here acts as on a group of one.

Imports torch and the standard library only.
"""
import datetime
import os
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool


def init_distributed(timeout=None):
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA) or run as one plain process.

    Reads RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; calling it again returns the
    same information without re-initialising. `timeout` (seconds): how long a collective waits
    for the other ranks before the group fails (None: torch's default, 10 minutes for NCCL, 30
    for gloo). ValueError when LOCAL_RANK has no GPU of its own (cuda_index).
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if torch.cuda.is_available():
        device = torch.device('cuda', cuda_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    distributed = world_size > 1
    wait = None if timeout is None else datetime.timedelta(seconds=timeout)
    if distributed and not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        shared_store = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
        if shared_store and os.environ.get('GROUP_WORLD_SIZE', '1') == '1':
            # torchrun keeps one store server across restarts of the worker group
            # (--max-restarts), and torch 2.14 gives the workers no namespace per attempt: a
            # restarted worker can read a dead peer's address left by the attempt before and
            # fail to connect. One namespace per attempt, as torch's env:// used to do; with a
            # single agent every worker has the same restart count. (Several agents may count
            # differently: there TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives a store per attempt.)
            store = dist.PrefixStore(
                f"/worker/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']),
                              world_size, is_master=False))
            dist.init_process_group(backend=backend, store=store, world_size=world_size,
                                    rank=rank, timeout=wait)
        else:
            dist.init_process_group(backend=backend, init_method='env://',
                                    world_size=world_size, rank=rank, timeout=wait)
            if (shared_store and rank == 0
                    and int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', '0')) > 0):
                sys.stderr.write('warning: torchrun keeps one store across restarts of this '
                                 'several-node group, where a restarted worker may fail to '
                                 'connect; launch it with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 '
                                 '(README: Long runs on a cluster)\n')
    return DistInfo(rank, world_size, local_rank, device, distributed)


def cuda_index(local_rank, visible):
    """The GPU of the process with this LOCAL_RANK that sees `visible` GPUs: cuda:LOCAL_RANK, or
    the one GPU a process sees when its launcher gave each process its own (srun
    --gpus-per-task=1, CUDA_VISIBLE_DEVICES set per task) and started it without torchrun (which
    sets LOCAL_WORLD_SIZE). Otherwise ValueError: two ranks would share a GPU, or none is left."""
    if local_rank < visible:
        return local_rank
    if visible == 1 and 'LOCAL_WORLD_SIZE' not in os.environ:
        return 0
    raise ValueError(f'LOCAL_RANK {local_rank}, but this process sees {visible} GPU(s) '
                     f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                     f'start at most {visible} process(es) per node, or give each process a GPU '
                     'of its own')


def in_group():
    """True in a process that has joined a process group."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world():
    """(rank, world size) of this process: (0, 1) without a process group."""
    if in_group():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process():
    """True on rank 0, and in a process without a process group."""
    return rank_and_world()[0] == 0


def print0(*parts):
    """print() on rank 0 only (the other ranks stay silent)."""
    if is_main_process():
        print(*parts, flush=True)


def all_reduce_sum(t):
    """t summed over the ranks, in place (and returned)."""
    if in_group():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t):
    """t's element-wise maximum over the ranks, in place (and returned)."""
    if in_group():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def max_over_ranks(values, device):
    """Element-wise maximum of a list of numbers over the ranks: the same decision everywhere
    (at an epoch end: the signal that any rank received)."""
    return all_reduce_max(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def broadcast_from_rank0(t):
    """t as rank 0 has it, on every rank, in place (and returned)."""
    if in_group():
        dist.broadcast(t, src=0)
    return t


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (a one-item list without a group)."""
    if not in_group():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects
