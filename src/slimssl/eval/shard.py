"""An evaluation shared by the processes of a multi-process pretraining (torchrun): each process extracts the
features of every ``count``-th image, and the results are merged so that every process ends with the same
numbers, the ones a single process would measure."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class Shard:
    """This process's part: the images ``index``, ``index + count``, ... of each split. ``count`` 1: all."""

    index: int = 0
    count: int = 1

    @classmethod
    def of_processes(cls, *sizes: int) -> Shard:
        """This process's part when the default process group is running and every split of ``sizes`` has an
        image for each process; the whole (every process doing all the work) otherwise."""
        if not (dist.is_available() and dist.is_initialized()) or min(sizes, default=0) < dist.get_world_size():
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def sharded(self) -> bool:
        return self.count > 1

    def indices(self, size: int) -> torch.Tensor | None:
        """The indices of this process's images of a split of ``size``; None for all of them."""
        return torch.arange(self.index, size, self.count) if self.sharded else None

    def gather_rows(self, rows: torch.Tensor, size: int) -> torch.Tensor:
        """Every process's ``rows`` (those of :meth:`indices` of ``size``) put back in the split's order."""
        if not self.sharded:
            return rows
        most = -(-size // self.count)  # the first processes have one row more than the last ones
        parts = [torch.empty((most, *rows.shape[1:]), dtype=rows.dtype, device=rows.device) for _ in range(self.count)]
        dist.all_gather(parts, F.pad(rows, (0, 0, 0, most - len(rows))).contiguous())
        # parts[p][j] is row p + j * count of the split: interleave, then drop the padding at the end
        return torch.stack(parts, dim=1).flatten(0, 1)[:size]

    def size_and_largest(self, rows: int, device: torch.device) -> tuple[int, int]:
        """The number of rows over all processes, and the most that one process holds."""
        if not self.sharded:
            return rows, rows
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.count)]
        dist.all_gather(counts, torch.tensor([rows], dtype=torch.int64, device=device))
        return int(sum(c.item() for c in counts)), int(max(c.item() for c in counts))

    def nearest(self, similarities: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest of every process's (query rows of) ``similarities`` to its bank entries, sorted,
        and those entries' labels. Each process passes its own top ``min(k, its entries)``."""
        if not self.sharded:
            return similarities, labels
        missing = k - similarities.shape[1]  # a process with fewer than k entries: filled with nothing-votes
        similarities = F.pad(similarities, (0, missing), value=float("-inf"))
        labels = F.pad(labels, (0, missing))
        every_sim = [torch.empty_like(similarities) for _ in range(self.count)]
        every_label = [torch.empty_like(labels) for _ in range(self.count)]
        dist.all_gather(every_sim, similarities.contiguous())
        dist.all_gather(every_label, labels.contiguous())
        top, where = torch.cat(every_sim, dim=1).topk(k, dim=1)
        return top, torch.cat(every_label, dim=1).gather(1, where)
