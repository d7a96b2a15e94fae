"""Where a process stands in a ``torchrun`` job, and the barrier its ranks meet at."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from lmgen_fast.jobs.inputs import JobError

# Ranks that finish their shard wait at the final barrier for the slowest one, possibly for
# hours; the default timeouts (10 to 30 minutes) would fail a run that is merely uneven.
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a torchrun job (rank 0 of 1 outside one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def dist_env(environ: dict | None = None) -> DistEnv:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise JobError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise JobError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistEnv(rank, world, local)


def barrier(env: DistEnv, *, last: bool = True) -> None:
    """Wait for every rank: after rank 0 set the output up, and when every shard is done.

    Gloo is used on every device: the barrier moves no tensors, and unlike NCCL it needs no
    GPU memory or device binding, and has no watchdog that kills a rank waiting for hours
    on a slower one. If a rank fails before a barrier, torchrun stops the others.

    Parameters
    ----------
    env : DistEnv
        This process's place in the job.
    last : bool
        Tear the process group down after the barrier (the final one).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    dist.barrier()
    if last:
        dist.destroy_process_group()


