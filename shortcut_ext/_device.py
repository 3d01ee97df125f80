"""The ``--device`` option of the commands: parsed once, with clear errors."""
from __future__ import annotations

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
