"""What the data-parallel pieces (HessianOperator, train) share over ``torch.distributed``."""
from __future__ import annotations

import contextlib

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


def _checksum(t: torch.Tensor) -> tuple[float, float]:
    """Order-sensitive checksum and sum of squares of ``t``, in float64 chunks (no full-size copy)."""
    flat = t.detach().reshape(-1)
    chunk = 1 << 20
    total, sq = 0.0, 0.0
    for s in range(0, flat.numel(), chunk):
        c = flat[s:s + chunk].double()
        pos = (torch.arange(s, s + c.numel(), dtype=torch.float64, device=c.device) % 9973) + 1
        total += float((c * pos).sum())
        sq += float((c * c).sum())
    return total, sq


def model_signature(model, **settings) -> dict:
    """Labelled numbers that tell two ranks' models apart (for :func:`ranks_agree`'s ``extra``): order-sensitive
    checksums of the weight and of the frozen projections (``input_proj``, ``readout``), a hash of the
    architecture (``repr``-level fields, dtype), and one hash per setting (``settings``: the loss, a
    configuration's fields), so that a refusal names the setting that differs."""
    import hashlib
    import json

    out = {"weight checksum (order-sensitive)": _checksum(model.weight)[0]}
    for name in ("input_proj", "readout"):
        b = getattr(model, name, None)
        c = _checksum(b) if isinstance(b, torch.Tensor) else (0.0, 0.0)
        out[f"frozen {name} (order-sensitive checksum)"] = c[0]
        out[f"frozen {name} (sum of squares)"] = c[1]
    # the architecture, not labels that do not change the function (init, backend)
    arch = [type(model).__name__, tuple(model.weight.shape), getattr(model, "shortcut", None),
            getattr(model, "activations", None), getattr(model, "in_features", None),
            getattr(model, "out_features", None), str(model.weight.dtype)]
    h = lambda text: float(int(hashlib.sha1(text.encode()).hexdigest()[:12], 16))  # noqa: E731  48 bits: exact
    out["architecture (hash)"] = h("|".join(map(str, arch)))
    for k, v in sorted(settings.items()):
        out[f"setting {k}"] = h(json.dumps(v, sort_keys=True, default=str))
    return out


def ranks_agree(weight: torch.Tensor, local_count: int, local_error, group, rank: int, what: str,
                extra=()) -> int:
    """The sum of ``local_count`` over the ranks, after checking in one pair of collectives that no
    rank's local checks failed (``local_error``: that rank's exception, re-raised there) and that every
    rank holds the same ``weight`` (and ``extra`` numbers: a ``{label: number}`` dict or a sequence).
    Raises on every rank, naming what differs; never leaves one waiting in a collective."""
    import torch.distributed as dist

    w = weight.detach().double()
    labels = {"number of weights P": float(w.numel()), "sum(w)": float(w.sum()), "sum(w^2)": float((w * w).sum())}
    extra = dict(extra) if isinstance(extra, dict) else {f"extra[{i}]": v for i, v in enumerate(extra)}
    labels.update({k: float(v) for k, v in extra.items()})
    vals = torch.tensor(list(labels.values()), dtype=torch.float64, device=weight.device)
    nan = torch.isnan(vals)
    # a nan compares as its own flag (MAX / MIN of nan against a number is nan on every rank: the values alone
    # would let a nan model agree with a finite one); identical nan models (a diverged model probed on every
    # rank) agree
    mine = torch.cat([torch.where(nan, torch.zeros_like(vals), vals), nan.double(),
                      torch.tensor([float(local_error is not None)], dtype=torch.float64, device=weight.device)])
    hi, lo = all_reduce(mine.clone(), group, dist.ReduceOp.MAX), all_reduce(mine.clone(), group, dist.ReduceOp.MIN)
    if local_error is not None:
        raise type(local_error)(f"rank {rank}: {local_error}") from local_error
    if hi[-1] > 0:
        raise ValueError(f"{what}: another rank's data failed its checks (see its error); rank {rank} stops too")
    n = vals.numel()
    same = torch.isclose(hi[:n], lo[:n], rtol=1e-12, atol=0.0) & (hi[n:2 * n] == lo[n:2 * n])
    if not bool(same.all()):
        names = [k for k, ok in zip(labels, same.tolist()) if not ok]
        settings = [k[len("setting "):] for k in names if k.startswith("setting ")]
        model_side = [k for k in names if not k.startswith(("setting ", "extra"))]
        raise ValueError(
            f"{what}: distributed=True needs the same model and settings on every rank; the ranks differ in: "
            f"{', '.join(names)} (rank {rank}: " + ", ".join(f"{k} = {labels[k]:.17g}" for k in names) + "); "
            + "; ".join(([f"pass the same {', '.join(settings)} on every rank"] if settings else [])
                        + (["build the same model on every rank (same seed), or broadcast its weight and frozen "
                            "projections (input_proj, readout) from rank 0"] if model_side else [])))
    count = torch.tensor([float(local_count)], dtype=torch.float64, device=weight.device)
    return int(all_reduce(count, group).item())


def _reason(e: BaseException) -> str:
    """One line for another rank: a ``SystemExit``'s message, or an exception's type and text."""
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, str) else f"exit status {e.code}"
    return f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def together(distributed: bool, command: str, group=None):
    """A block of a command's rank-local work (reading files, checking options: no collective inside) after
    which every rank stops if any rank failed in it.  Each rank's failure (a ``SystemExit`` or an exception)
    is shared in one ``all_gather_object`` at the block's end: the failed rank raises its own, every other
    rank a ``SystemExit`` naming the first failed rank and its reason.  Without it a rank that stops alone
    (a ``--weights`` file missing on one node) leaves the others waiting in their next collective until the
    process group's timeout.  Without ``distributed`` the block runs as it is."""
    if not distributed:
        yield
        return
    import torch.distributed as dist

    err = None
    try:
        yield
    except (SystemExit, Exception) as e:  # noqa: BLE001 -- every failure is shared, then raised again
        err = e
    said = [None] * dist.get_world_size(group)
    dist.all_gather_object(said, None if err is None else _reason(err), group=group)
    if err is not None:
        raise err
    failed = [(r, m) for r, m in enumerate(said) if m is not None]
    if failed:
        r, m = failed[0]
        raise SystemExit(f"shortcut-ext {command}: --distributed: rank {r} stopped ({m}); rank "
                         f"{dist.get_rank(group)} stops too")
