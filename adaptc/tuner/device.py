"""The device a tuning record is valid for, described once and hashed into a short stable id.

A tuned config is only worth reusing on hardware that runs it the same way, so every record's key
carries `DeviceFingerprint.id`. The id hashes only what changes the best config (GPU model, compute
capability, SM count; CPU model, cores, vector ISA) — not driver or memory-size noise, so a driver
update does not throw away a fleet's tuning. Torch and Triton versions are in the fingerprint but go
into the record key separately, where they are visible.

Importing this module never imports torch or touches CUDA; only asking about a CUDA device does.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from importlib import metadata

# Flags that change which CPU code path (and so which block size) wins. The rest of /proc/cpuinfo's
# flags (mitigations, virtualisation hints) differ between hosts of the same model and would split
# the cache for nothing.
_ISA_PATTERN = re.compile(
    r"^(sse4_[12]|avx|avx2|fma|f16c|avx512\w*|avx_vnni\w*|amx\w*|"  # x86
    r"asimd\w*|sve\w*|sme(?!p)\w*|bf16|i8mm|fphp|dotprod)$"              # arm
)


@dataclass(frozen=True)
class DeviceFingerprint:
    """What a tuning result depends on, for one device. `id` is what record keys carry."""

    kind: str                                  # "cuda" (also ROCm through torch.cuda) or "cpu"
    name: str                                  # normalised: single spaces, no trailing junk
    arch: str                                  # machine architecture (x86_64, aarch64)
    compute_capability: str | None = None      # "9.0"; gfx arch name on ROCm
    sm_count: int | None = None
    memory_bytes: int | None = None
    cuda_version: str | None = None            # the toolkit torch was built with (or HIP)
    driver_version: str | None = None
    cores: int | None = None                   # CPU: logical cores this process may use
    isa: tuple[str, ...] = field(default_factory=tuple)
    torch_version: str = "none"
    triton_version: str = "none"

    @property
    def id(self) -> str:
        """`<readable-slug>-<12 hex>`: readable in `adaptc cache list`, unique by the hash."""
        parts = {
            "kind": self.kind, "name": self.name, "arch": self.arch,
            "cc": self.compute_capability, "sm": self.sm_count,
            "cores": self.cores if self.kind == "cpu" else None,
            "isa": list(self.isa) if self.kind == "cpu" else [],
        }
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
        slug = re.sub(r"[^a-z0-9]+", "-", f"{self.kind} {self.name}".lower()).strip("-")[:40]
        return f"{slug}-{digest}"

    @property
    def units(self) -> int:
        """Parallel units a kernel's grid is spread over: SMs on a GPU, cores on a CPU."""
        return int(self.sm_count or self.cores or 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["isa"] = list(self.isa)
        d["id"] = self.id
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceFingerprint":
        return cls(**{k: (tuple(v) if k == "isa" else v) for k, v in d.items() if k != "id"})


def device_fingerprint(device: object = "cpu") -> DeviceFingerprint:
    """The fingerprint of `device` ("cpu", "cuda", "cuda:1" or a torch.device). Cached per device."""
    if isinstance(device, DeviceFingerprint):
        return device
    text = str(device)
    kind, _, index = text.partition(":")
    if kind == "cuda":
        return _cuda_fingerprint(int(index) if index else None)
    if kind != "cpu":
        raise ValueError(f"no fingerprint for device {text!r}; expected 'cpu' or 'cuda[:N]'")
    return _cpu_fingerprint()


def package_version(name: str) -> str:
    """Installed version without importing the package (importing Triton or torch is slow)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def _normalise_name(name: str) -> str:
    return " ".join(name.replace("\x00", "").split())


@functools.lru_cache(maxsize=None)
def _cpu_fingerprint() -> DeviceFingerprint:
    name, flags = _read_cpuinfo()
    if not name:
        name = platform.processor() or platform.machine() or "unknown cpu"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return DeviceFingerprint(
        kind="cpu",
        name=_normalise_name(name),
        arch=platform.machine() or "unknown",
        cores=cores,
        isa=tuple(sorted(f for f in flags if _ISA_PATTERN.match(f))),
        memory_bytes=_total_memory(),
        torch_version=package_version("torch"),
        triton_version=package_version("triton"),
    )


def _read_cpuinfo() -> tuple[str, set[str]]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return "", set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        # x86 says "model name"/"flags"; arm says "Features" and sometimes only "CPU part".
        if not name and key in ("model name", "hardware", "cpu model", "processor") and not value.strip().isdigit():
            name = value.strip()
        elif not flags and key in ("flags", "features"):
            flags = set(value.split())
    return name, flags


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def _cuda_fingerprint(index: int | None) -> DeviceFingerprint:
    import torch  # only here: asking about a CUDA device is the one thing that may initialise it

    if not torch.cuda.is_available():
        raise RuntimeError("a CUDA device fingerprint was asked for, but torch sees no CUDA device")
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    hip = getattr(torch.version, "hip", None)
    cc = getattr(props, "gcnArchName", None) if hip else f"{props.major}.{props.minor}"
    return DeviceFingerprint(
        kind="cuda",
        name=_normalise_name(props.name),
        arch=platform.machine() or "unknown",
        compute_capability=cc,
        sm_count=int(props.multi_processor_count),
        memory_bytes=int(props.total_memory),
        cuda_version=hip or torch.version.cuda,
        driver_version=_nvidia_driver_version(),
        torch_version=torch.__version__,
        triton_version=package_version("triton"),
    )


def _nvidia_driver_version() -> str | None:
    # Read from the kernel module rather than through NVML: no extra dependency, no CUDA context.
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", f.read())
    except OSError:
        return None
    return m.group(1) if m else None
