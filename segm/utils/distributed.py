"""Process-group set-up from torchrun's environment first, then SLURM's, else a single process.

SLURM jobs get a master port derived from the job id, so two jobs sharing a node do not collide.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from tokred.errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank, the world size, its local rank and the rendezvous address."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise UsageError(f"cannot read the SLURM node list '{nodelist}'")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_port(job_id: str) -> int:
    """A rendezvous port in 20000..59999 derived from the job id."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 40000


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``), else SLURM, else single."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else slurm_port(env.get("SLURM_JOB_ID", "0")),
            launcher="slurm",
        )
    return DistEnv()


def init_distributed(device: torch.device) -> DistEnv:
    """Detect the environment; with several processes, bind the GPU and join the process group.

    NCCL on CUDA, gloo on CPU. A single process needs no process group.
    """
    env = detect_env()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank if env.distributed else (device.index or 0))
    if env.distributed and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
        )
    return env


def process_device(requested: torch.device, env: DistEnv) -> torch.device:
    """The device of this process: ``cuda:<local_rank>`` when CUDA is requested, else the request."""
    if requested.type == "cuda":
        return torch.device("cuda", env.local_rank if env.distributed else (requested.index or 0))
    return requested


def is_distributed() -> bool:
    """Whether a process group is running (torchrun/SLURM with more than the one process)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (a no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


def replicas_identical(module: torch.nn.Module) -> bool:
    """Whether every process holds exactly the same parameters (compares per-tensor float64 sums)."""
    if not is_distributed():
        return True
    sums = torch.stack([p.detach().double().sum() for p in module.parameters()]).cpu()
    gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums.to(_collective_device()))
    return all(torch.equal(g.cpu(), sums) for g in gathered)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
