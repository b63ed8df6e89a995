"""Where torch work runs: one spelling of a device name, one way to move a batch there.

A device name is `cpu`, `cuda`, `cuda:N`, `auto` (CUDA where torch sees it, else the CPU), or a
`torch.device`. Every entry point that takes a device (training, evaluation, map builds) resolves it
here, so a bad name or a missing GPU gets the same one-line error everywhere.
"""

from __future__ import annotations

import torch

__all__ = ["DeviceError", "resolve_device", "model_device", "to_device"]


class DeviceError(ValueError):
    """A device name that does not parse, or names a device this machine does not have."""


def resolve_device(name: "str | torch.device | None" = "auto") -> torch.device:
    """The `torch.device` for `name` (None or "auto": CUDA when available, else CPU).

    Raises DeviceError, naming the device, for a name torch does not parse, CUDA requested where torch
    sees none, or a CUDA index past the device count."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device {name!r}: {e} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: torch {torch.__version__} sees no CUDA device here (use cpu)")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (a model lives on one device)."""
    return next(model.parameters()).device


def to_device(batch: dict, device: "str | torch.device") -> dict:
    """The batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
