"""torch.distributed for distillation: process-group setup and batch statistics over all ranks.

With DDP each process sees ``batch_size / world`` images. BatchNorm would normalise with the
statistics of that slice alone, so N processes would not train the same model as one process
with the whole batch. On CUDA ``nn.SyncBatchNorm`` fixes that; it does not run on the CPU, so
for CPU (gloo) runs :func:`global_batch_norm` computes every training-mode batch norm from the
sums over all ranks, through an autograd-aware all-reduce.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


_batch_norm = F.batch_norm


def _all_rank_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                         momentum=0.1, eps=1e-5):
    if not training:
        return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    from torch.distributed.nn import functional as dist_fn

    c = input.shape[1]
    dims = [0, *range(2, input.dim())]
    local = torch.cat([input.sum(dims), (input * input).sum(dims),
                       torch.full((1,), input.numel() / c, dtype=input.dtype, device=input.device)])
    total = dist_fn.all_reduce(local)  # sum over ranks; its backward sums the gradients over ranks
    n = total[-1]
    mean = total[:c] / n
    var = total[c : 2 * c] / n - mean * mean
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)), alpha=momentum)
    shape = [1, c] + [1] * (input.dim() - 2)
    out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


@contextlib.contextmanager
def global_batch_norm(enabled: bool) -> Iterator[None]:
    """While active, training-mode ``F.batch_norm`` (torch's and timm's BatchNorm layers) uses all ranks' statistics."""
    if not enabled:
        yield
        return
    F.batch_norm = _all_rank_batch_norm
    try:
        yield
    finally:
        F.batch_norm = _batch_norm


def max_abs_diff_to_rank0(params, dist: Dist) -> float | None:
    """Largest difference between any rank's weights and rank 0's (0.0 when DDP kept them in step)."""
    if dist.world <= 1:
        return None
    import torch.distributed as tdist

    flat = torch.cat([p.detach().float().flatten().cpu() for p in params])
    ref = flat.clone()
    tdist.broadcast(ref, src=0)
    diff = torch.tensor([(flat - ref).abs().max().item()])
    tdist.all_reduce(diff, op=tdist.ReduceOp.MAX)
    return float(diff)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order; gradients flow back to each rank's part."""
    import torch.distributed as tdist
    from torch.distributed.nn import functional as dist_fn

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return x
    if x.requires_grad:
        return torch.cat(dist_fn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
