"""Kernels by name: a plain-torch reference (the oracle and fallback) and its implementations.

Each kernel folder (`adaptc/kernels/<name>/`) registers one `Kernel`. Which implementation runs is a
`KernelPreference`; AUTO picks Triton for CUDA tensors and the CPU implementation otherwise, and
falls back to the reference where an implementation's `supports()` declines (with its reason).
"""
from __future__ import annotations

import contextlib
import contextvars
import enum
from dataclasses import dataclass, field
from typing import Any, Callable


class KernelPreference(str, enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"  # plain torch: the oracle
    TRITON = "triton"        # also runs on CPU tensors under TRITON_INTERPRET=1
    CPU = "cpu"


@dataclass(frozen=True)
class Implementation:
    fn: Callable[..., Any]
    # supports(*args) -> None when it can run these arguments, else the reason it cannot.
    supports: Callable[..., str | None] = lambda *a, **k: None


@dataclass
class Kernel:
    name: str
    reference: Callable[..., Any]
    implementations: dict[str, Implementation] = field(default_factory=dict)

    def select(self, device_type: str, *args: Any) -> tuple[str, Callable[..., Any]]:
        """The implementation to run on `device_type` for these arguments, and its name."""
        pref = _preference.get()
        if pref is KernelPreference.REFERENCE:
            return "reference", self.reference
        wanted = pref.value if pref is not KernelPreference.AUTO else ("triton" if device_type == "cuda" else "cpu")
        impl = self.implementations.get(wanted)
        if impl is not None and impl.supports(*args) is None:
            return wanted, impl.fn
        return "reference", self.reference

    def why_not(self, impl_name: str, *args: Any) -> str | None:
        impl = self.implementations.get(impl_name)
        return f"no {impl_name} implementation" if impl is None else impl.supports(*args)


KERNELS: dict[str, Kernel] = {}
_preference: contextvars.ContextVar[KernelPreference] = contextvars.ContextVar(
    "adaptc_kernel_preference", default=KernelPreference.AUTO
)


def register(kernel: Kernel) -> Kernel:
    KERNELS[kernel.name] = kernel
    return kernel


@contextlib.contextmanager
def kernel_preference(pref: KernelPreference | str):
    """Run the block with every adaptc op using `pref` (e.g. "reference" to get the oracle)."""
    token = _preference.set(KernelPreference(pref))
    try:
        yield
    finally:
        _preference.reset(token)


# Tuned tile/knob configs by (kernel, problem key). The tuner fills this; kernels read it and fall
# back to their space's heuristic default.
_CONFIGS: dict[tuple[str, str], dict[str, Any]] = {}


def config_for(kernel: str, problem_key: str, default: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    cfg = _CONFIGS.get((kernel, problem_key))
    return dict(cfg) if cfg is not None else default()


def set_config(kernel: str, problem_key: str, config: dict[str, Any]) -> None:
    _CONFIGS[(kernel, problem_key)] = dict(config)
