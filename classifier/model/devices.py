"""The `--device` option as a torch device, checked against this machine before any work is done on it."""

from __future__ import annotations

import torch


def device_of(name: str) -> torch.device:
    """`--device` as a torch device this machine has, or a one-line error naming it."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name} is not a device torch knows (such as cpu, cuda, cuda:1 or mps)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device on this machine; use --device cpu")
    return device
