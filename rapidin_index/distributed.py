"""Scale-out on torch.distributed: ranks started by ``torchrun`` share one index.

Work is split by store chunk: chunk ``c`` belongs to rank ``c % world_size``. A rank
computes the examples of its chunks and writes those chunk files and their progress
markers; rank 0 alone folds the markers into the manifest (:meth:`Store.commit`). Since a
RapidGrad depends only on its example (and, with batching, on batches that start at chunk
boundaries), the store does not depend on the number of ranks, and a build rerun with any
number of ranks continues each chunk from its marker.

Queries shard the same way: each rank scans its chunks, and rank 0 merges the per-rank
top-k lists.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Ranks wait for each other at the end of a build; the slowest may be hours behind.
_BARRIER_TIMEOUT = timedelta(hours=48)


@dataclass
class DistContext:
    """Where this process stands in a (possibly trivial) process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistContext:
        """Join the process group that ``torchrun`` describes in the environment, if any."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend, timeout=_BARRIER_TIMEOUT)
            logger.info("rank %d of %d joined (%s)", dist.get_rank(), world, backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def device(self) -> torch.device:
        """cuda:<local rank modulo GPUs> when GPUs exist (several ranks may share one)."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            # gloo's barrier cannot take a device; NCCL needs one per rank.
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.device().index])
            else:
                dist.barrier()

    def owns_chunk(self, chunk: int) -> bool:
        return chunk % self.world_size == self.rank

    def gather(self, obj: object) -> list[object]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def merge_ranked(
    parts: list[tuple[np.ndarray, np.ndarray]], k: int, largest: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ranked lists ``(ids (n,), scores (n,))`` into the global top k.

    Ordering matches a single scan: by score (descending when ``largest``), ties to the
    lower id.
    """
    ids = np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts])
    scores = np.concatenate([np.asarray(p[1], dtype=np.float32) for p in parts])
    key = -scores if largest else scores
    order = np.lexsort((ids, key))[:k]
    return ids[order], scores[order]


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    """The command line that runs ``python -m rapidin_index ARGS`` on ``nproc`` local ranks."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "rapidin_index",
        *module_args,
    ]
