"""The ``--device`` and ``--distributed`` options of the commands: parsed once, with clear errors."""
from __future__ import annotations

import os

import torch


def parse_device(device: str, command: str) -> str:
    """``device`` as torch spells it (``cpu``, ``cuda``, ``cuda:1``), or ``SystemExit`` naming
    ``shortcut-ext <command> --device``: unknown names, other device types, CUDA where none is visible."""
    where = f"shortcut-ext {command}: --device"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"{where} must be a torch device such as cpu, cuda or cuda:1, got {device!r} ({e})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SystemExit(f"{where} {device}: no CUDA device is visible "
                             f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
        if dev.index is not None and dev.index >= count:
            raise SystemExit(f"{where} {device}: only {count} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise SystemExit(f"{where} must be cpu or cuda[:N], got {device!r}")
    return str(dev)


def init_distributed(command: str, device: str = "cpu") -> tuple[bool, int, int, str]:
    """The process group of a torchrun launch, unless one exists: gloo on cpu, NCCL on cuda, where each
    rank takes ``cuda:LOCAL_RANK``.  Returns ``(created, rank, world_size, device)``; the caller
    destroys the group if it was created here."""
    import torch.distributed as dist

    where = f"shortcut-ext {command}: --distributed"
    if not dist.is_available():
        raise SystemExit(f"{where} needs torch.distributed, which this torch lacks")
    created = False
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise SystemExit(f"{where} runs under torchrun (e.g. torchrun --standalone --nproc_per_node=2 -m "
                             f"shortcut_ext {command} ... --distributed); the environment lacks {', '.join(missing)}")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise SystemExit(f"{where}: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) "
                                 "are visible")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        created = True
    if cuda:
        device = f"cuda:{torch.cuda.current_device()}"
    return created, dist.get_rank(), dist.get_world_size(), device
