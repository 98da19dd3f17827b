"""What a compile was asked to do, as a dataclass that validates itself and round-trips through JSON."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 2  # 2: typed pass configs (pass_configs) instead of untyped options
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
    # Opt-in for now: on CPU it adds minutes to an LLM's compile and does not yet beat torch.compile
    # (adaptc::attention stays opaque to it; benchmarks/results/dense-*.md).
    inductor: bool = False
    # Progress bars for the long steps (distillation, tuning): None shows them when stderr is a
    # terminal, else one summary line a step; True always; False never, and no summary lines either.
    progress: bool | None = None
    # One quality budget for the approximate passes (adaptc/budget.py): their settings searched jointly and
    # certified end to end, the frontier recorded. None: when two or more approximate passes are selected;
    # True: also for one (a frontier to retarget on); False: each pass calibrates alone.
    budget: bool | None = None
    # The selected passes' typed configs by pass name (adaptc.passes: EarlyExitConfig, ...).
    pass_configs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.passes, str):
            self.passes = None if self.passes in ("exact", "all_exact") else [self.passes]
        if self.capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {self.capture!r}")
        if self.quality is not None and not 0.0 < self.quality <= 1.0:
            raise ValueError(f"quality must be in (0, 1], got {self.quality}")
        if self.verify_random_inputs < 0:
            raise ValueError("verify_random_inputs must be >= 0")
        if self.budget not in (None, True, False):
            raise ValueError(f"budget must be None (two or more approximate passes), True or False, got {self.budget!r}")
        if self.progress not in (None, True, False):
            raise ValueError(f"progress must be None (bars on a terminal), True or False, got {self.progress!r}")
        if self.tune_trials < 1 or self.tune_seconds <= 0:
            raise ValueError("tune_trials must be >= 1 and tune_seconds > 0 (tune=False turns tuning off)")
        from .passes._config import PassConfig

        bad = [k for k, v in self.pass_configs.items() if not isinstance(v, PassConfig)]
        if bad:
            raise ValueError(f"pass_configs[{bad[0]!r}] is not a pass config (adaptc.passes.*Config)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each pass config with its type and version; live objects in it (a tokenizer)
        appear by their type name."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "pass_configs"}
        d["passes"] = list(self.passes) if self.passes is not None else None
        d["pass_configs"] = {name: c.to_dict() for name, c in self.pass_configs.items()}
        return {"type": "CompileConfig", "version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompileConfig":
        """The inverse of to_dict; pass configs come back only as adaptc's own config classes (ValueError
        for any other type). Version 1 (untyped `options`) reads with default pass configs."""
        from .passes import load_config

        data = dict(data)
        version = data.pop("version", None)
        if data.pop("type", "CompileConfig") != "CompileConfig" or version not in (1, CONFIG_VERSION):
            raise ValueError("not a CompileConfig of this version")
        data.pop("options", None)  # version 1: what compile was told, recorded untyped; not needed to rebuild
        configs = data.pop("pass_configs", {}) or {}
        if not isinstance(configs, dict):
            raise ValueError("pass_configs is not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names},
                   pass_configs={name: load_config(c) for name, c in configs.items()})
