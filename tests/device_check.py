"""A dispatch-level check that code runs on one device without host synchronisation.

:class:`DeviceRecorder` is a :class:`~torch.utils._python_dispatch.TorchDispatchMode`: it
sees every ATen operation that runs inside it, records the devices of its tensor arguments
and results, and stops at the first operation that

- reads a tensor's value on the host (``aten._local_scalar_dense`` behind ``.item()``,
  ``float(t)``, ``bool(t)`` and every Python ``if`` on a tensor; ``aten.is_nonzero``,
  ``aten.equal``; ops whose output shape depends on values, such as ``nonzero`` and boolean
  indexing), each of which makes a GPU wait for its queue to drain; or
- mixes devices: a tensor on the device the code runs on with one of more than one element
  on another (a constant made without ``device=``), or copies between devices (a
  ``.cpu()`` in the middle of a step, a constant moved to the device). Work on the CPU
  alone is not a mix (Pyro's plates make their index tensors there), and a CPU tensor of
  one element is a Python scalar that torch wraps, which CUDA kernels take.

On a machine without a GPU the tests run the code on the ``meta`` device, where tensors have
shapes but no values: there any value read fails and any CPU tensor is a stray, just as on a
GPU, so the check does not need one. The error names the operation and the innermost
pyroflows source line that called it.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pyroflows

aten = torch.ops.aten
#: operations that read values back to the host, or whose output shape depends on values
SYNCING = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_dim.default,
    aten._unique2.default,
    aten.allclose.default,
}
#: operations that copy between devices (a ``.cpu()``, or a constant moved to the device)
COPYING = {aten._to_copy.default, aten.copy_.default}
PACKAGE = str(Path(pyroflows.__file__).parent)


class HostSyncError(RuntimeError):
    """An operation inside the checked code read a value on the host or mixed devices."""


class DeviceRecorder(TorchDispatchMode):
    """Record the devices every operation touches; raise on a host sync or a stray device.

    Example:
        >>> with DeviceRecorder(torch.device("meta")) as seen:
        ...     y = torch.ones(3, device="meta") * 2
        >>> sorted(seen.devices)
        ['meta']
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.devices: set[str] = set()
        self.operations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if t.device == self.device]
        if func in SYNCING and on_device:  # the same on a CPU tensor costs nothing
            raise HostSyncError(f"host sync: {func} at {_caller()}")
        stray = [t for t in tensors if t.device != self.device and t.numel() > 1]
        if on_device and stray:
            raise HostSyncError(
                f"stray device: {func} mixes tensors on {self.device} with one on "
                f"{stray[0].device} (shape {tuple(stray[0].shape)}), at {_caller()}"
            )
        result = func(*args, **kwargs)
        results = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
        if func in COPYING and len({t.device for t in tensors + results}) > 1:
            raise HostSyncError(f"device transfer: {func} at {_caller()}")
        self.devices.update(t.device.type for t in tensors + results)
        self.operations += 1
        return result


def _caller() -> str:
    """The innermost line of pyroflows source on the stack (else the innermost line)."""
    frames = traceback.extract_stack()[:-3]
    ours = [f for f in frames if f.filename.startswith(PACKAGE)]
    frame = (ours or frames)[-1]
    return f"{frame.filename}:{frame.lineno} ({frame.name}: {frame.line})"
