"""What the data-parallel pieces (HessianOperator, train) share over ``torch.distributed``."""
from __future__ import annotations

import torch


def group_of(distributed: bool, process_group, what: str):
    """``(rank, world_size)`` of ``process_group`` for ``distributed=True`` (which needs an initialised
    group); ``(0, 1)`` otherwise.  Clear errors name ``what`` (the caller)."""
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    if not distributed:
        if process_group is not None:
            raise ValueError("process_group is used only with distributed=True")
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{what}: distributed=True needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group, e.g. under torchrun); none is initialised")
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def all_reduce(t: torch.Tensor, group=None, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); returns ``t``."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def model_signature(model, *texts) -> tuple[float, ...]:
    """Numbers that tell two ranks' models apart beyond the trunk weight's sums (for :func:`ranks_agree`'s
    ``extra``): an order-sensitive checksum of the weight, the sums of the frozen projections
    (``input_proj``, ``readout``), and a hash of the architecture (``repr``, dtype) and of ``texts`` (the
    loss, a configuration)."""
    import hashlib

    w = model.weight.detach().reshape(-1)
    chunk = 1 << 20  # in float64 a chunk at a time: no full-size copies of a large weight
    total = 0.0
    for s in range(0, w.numel(), chunk):
        c = w[s:s + chunk].double()
        pos = (torch.arange(s, s + c.numel(), dtype=torch.float64, device=c.device) % 9973) + 1
        total += float((c * pos).sum())
    nums = [total]
    for name in ("input_proj", "readout"):
        b = getattr(model, name, None)
        bd = b.detach().double() if isinstance(b, torch.Tensor) else None
        nums += [float(bd.sum()), float(bd.square().sum())] if bd is not None else [0.0, 0.0]
    # the architecture, not labels that do not change the function (init, backend)
    arch = [type(model).__name__, tuple(model.weight.shape), getattr(model, "shortcut", None),
            getattr(model, "activations", None), getattr(model, "in_features", None),
            getattr(model, "out_features", None), str(model.weight.dtype)]
    text = "|".join([*map(str, arch), *map(str, texts)])
    nums.append(float(int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)))  # 48 bits: exact in float64
    return tuple(nums)


def ranks_agree(weight: torch.Tensor, local_count: int, local_error, group, rank: int, what: str,
                extra=()) -> int:
    """The sum of ``local_count`` over the ranks, after checking in one pair of collectives that no
    rank's local checks failed (``local_error``: that rank's exception, re-raised there) and that every
    rank holds the same ``weight`` (and ``extra`` numbers).  Raises on every rank, never leaves one
    waiting in a collective."""
    import torch.distributed as dist

    w = weight.detach().double()
    mine = torch.tensor([float(w.numel()), float(w.sum()), float((w * w).sum()), *map(float, extra),
                         float(local_error is not None)], dtype=torch.float64, device=weight.device)
    hi, lo = all_reduce(mine.clone(), group, dist.ReduceOp.MAX), all_reduce(mine.clone(), group, dist.ReduceOp.MIN)
    if local_error is not None:
        raise type(local_error)(f"rank {rank}: {local_error}") from local_error
    if hi[-1] > 0:
        raise ValueError(f"{what}: another rank's data failed its checks (see its error); rank {rank} stops too")
    if not torch.allclose(hi[:-1], lo[:-1], rtol=1e-12, atol=0.0):
        raise ValueError(
            f"{what}: distributed=True needs the same model on every rank (weights, frozen projections, "
            f"architecture, loss and settings); the ranks differ (rank {rank}: "
            f"P = {w.numel()}, sum(w) = {float(mine[1]):.17g}, sum(w^2) = {float(mine[2]):.17g}); "
            "build the same model on every rank (same seed), or broadcast its weight and frozen projections "
            "(input_proj, readout) from rank 0")
    count = torch.tensor([float(local_count)], dtype=torch.float64, device=weight.device)
    return int(all_reduce(count, group).item())
