"""What a compile was asked to do, as a dataclass that validates itself and round-trips through JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 1
CAPTURE_MODES = ("auto", "graph", "export", "fx", "blocks")


@dataclass
class CompileConfig:
    # None / "exact": every exact pass that applies; a list names passes explicitly.
    passes: list[str] | None = None
    quality: float | None = None
    device: str | None = None
    # auto: a whole graph for pure functions (torch.export, else fx), block granularity for models driven
    # from Python (generate(), KV caches) or that cannot be captured. graph: a whole graph or a
    # CaptureError; export / fx: that method only; blocks: never a whole graph.
    capture: str = "auto"
    verify: bool = True
    # Fresh random inputs (other batch / sequence sizes) checked after each pass, besides the examples.
    verify_random_inputs: int = 2
    seed: int = 0
    # Tune the kernels the compiled module calls (on this device; the tuning cache first).
    tune: bool = True
    tune_trials: int = 12        # measurements per kernel problem, at most
    tune_seconds: float = 20.0   # wall time per kernel problem, at most
    # Time the result against the original (example size, one row, a decode step); a size it is slower at
    # is routed to the faster module (graphs) or the last pass is rolled back (blocks).
    speed_check: bool = True
    # Hand what the passes emit to torch.compile (Inductor, dynamic shapes): the whole forward, the
    # graph, or the dense parts of gated blocks; verified like a pass, eager with the reason if it fails.
    inductor: bool = True
    # Progress bars for the long steps (distillation, tuning): None shows them when stderr is a
    # terminal, else one summary line a step; True always; False never, and no summary lines either.
    progress: bool | None = None
    # Options the passes read (each pass declares its own: Pass.options); compile() refuses other names.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.passes, str):
            self.passes = None if self.passes in ("exact", "all_exact") else [self.passes]
        if self.capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {self.capture!r}")
        if self.quality is not None and not 0.0 < self.quality <= 1.0:
            raise ValueError(f"quality must be in (0, 1], got {self.quality}")
        if self.verify_random_inputs < 0:
            raise ValueError("verify_random_inputs must be >= 0")
        if self.progress not in (None, True, False):
            raise ValueError(f"progress must be None (bars on a terminal), True or False, got {self.progress!r}")
        if self.tune_trials < 1 or self.tune_seconds <= 0:
            raise ValueError("tune_trials must be >= 1 and tune_seconds > 0 (tune=False turns tuning off)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: options that are objects (a tokenizer, say) appear by their type name."""
        d = dataclasses.asdict(self)
        d["options"] = {k: v if _is_json(v) else f"<{type(v).__name__}>" for k, v in self.options.items()}
        return {"type": "CompileConfig", "version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompileConfig":
        data = dict(data)
        if data.pop("type", "CompileConfig") != "CompileConfig" or data.pop("version", None) != CONFIG_VERSION:
            raise ValueError("not a CompileConfig of this version")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
