"""What every Triton implementation checks first: where its tensors are, and how it was built."""
from __future__ import annotations

import torch


def device_reason(tensors: tuple[torch.Tensor, ...], interpreted: bool, module: str) -> str | None:
    """None when Triton kernels built `interpreted` (or not) can run on these tensors, else why not.

    Triton picks its interpreter when a kernel is defined, i.e. when `module` is first imported.
    """
    devices = {str(t.device) for t in tensors}
    if len(devices) > 1:
        return f"tensors are on different devices: {sorted(devices)}"
    device = tensors[0].device.type
    if device == "cuda":
        return None
    if device == "cpu":
        return None if interpreted else f"tensors are on cpu and TRITON_INTERPRET=1 was not set when {module} was first imported"
    return f"tensors are on {device}: Triton runs cuda tensors, or cpu ones under TRITON_INTERPRET=1"
