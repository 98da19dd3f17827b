"""Kernels by name: a plain-torch reference (the oracle and fallback) and its implementations.

Each kernel folder (`adaptc/kernels/<name>/`) registers one `Kernel`. Which implementation runs is a
`KernelPreference`; AUTO picks Triton for CUDA tensors and the CPU implementation otherwise, and
falls back to the reference where an implementation's `supports()` declines (with its reason).
"""
from __future__ import annotations

import ast
import contextlib
import contextvars
import enum
import functools
import importlib.util
import inspect
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


class KernelPreference(str, enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"  # plain torch: the oracle
    TRITON = "triton"        # also runs on CPU tensors under TRITON_INTERPRET=1
    CPU = "cpu"


@dataclass(frozen=True)
class ConfigSpace:
    """The knobs an implementation takes (`fn(*args, config=...)`) and which combinations can run."""

    knobs: dict[str, tuple[Any, ...]]              # candidate values per knob
    default: Callable[..., dict[str, Any]]          # default(*args): the untuned heuristic
    fits: Callable[..., bool] = lambda config, *args: True  # fits(config, *args): False prunes it

    def contains(self, config: Any) -> bool:
        """Whether `config` names exactly these knobs, each with one of its values (cached configs come
        from other machines: a value outside the space must never reach a kernel)."""
        return (isinstance(config, dict) and set(config) == set(self.knobs)
                and all(config[k] in values for k, values in self.knobs.items()))

    def configs(self, *args: Any) -> list[dict[str, Any]]:
        """Every combination of knob values that fits these arguments."""
        names = list(self.knobs)
        combos = (dict(zip(names, values)) for values in itertools.product(*self.knobs.values()))
        return [c for c in combos if self.fits(c, *args)]


@dataclass(frozen=True)
class Implementation:
    fn: Callable[..., Any]
    # supports(*args) -> None when it can run these arguments, else the reason it cannot.
    supports: Callable[..., str | None] = lambda *a, **k: None
    space: ConfigSpace | None = None  # None: nothing to tune


@dataclass
class Kernel:
    name: str
    reference: Callable[..., Any]
    implementations: dict[str, Implementation] = field(default_factory=dict)
    # problem(*args): the bucket a tuned config is valid for (JSON scalars, includes the dtype).
    problem: Callable[..., dict[str, Any]] = lambda *a: {}
    # features(problem): analytic numbers (FLOPs, bytes, ...) the cost model learns from.
    features: Callable[[dict[str, Any]], dict[str, float]] = lambda p: {}
    # tolerance(dtype): atol/rtol against the reference, for tests and for rejecting bad configs.
    tolerance: Callable[[Any], dict[str, float]] = lambda dtype: {"atol": 1e-4, "rtol": 1e-4}
    # example(problem, device): random arguments for a problem (ahead-of-time tuning, replay tables).
    example: Callable[[dict[str, Any], str], tuple] | None = None
    # check(problem): ValueError saying what is wrong with a problem given by hand; example() calls it too.
    check: Callable[[dict[str, Any]], None] = lambda p: None
    # config_features(impl, problem, config, units): what a config does to this problem on a device with
    # `units` parallel units (SMs, cores): tiles, waves, padding. For the cost model; None: none.
    config_features: Callable[[str, dict[str, Any], dict[str, Any], int], dict[str, float]] | None = None
    # agrees(got, want, tol): whether an output matches the reference's, for kernels whose output is not
    # one tensor to compare with allclose (tuples, integer indices). None: allclose.
    agrees: Callable[[Any, Any, dict[str, float]], bool] | None = None

    def matches(self, got: Any, want: Any, tol: dict[str, float]) -> bool:
        if self.agrees is not None:
            return self.agrees(got, want, tol)
        return torch.allclose(got.float(), want.float(), **tol)

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


def kernel_sources(kernel: Kernel) -> list[tuple[str, Path]]:
    """(module, file) of every source a kernel's code comes from, by module name: the modules its
    reference, implementations, spaces and problem functions are defined in, and every module of the
    same package they import at any depth, in function bodies too (Triton modules are imported on
    first use). What the implementation hash covers: editing any of these may change what a tuned
    config does. This registry is left out: it says which config runs, not what a config does."""
    fns = [kernel.reference, kernel.problem, kernel.features, kernel.tolerance, kernel.example, kernel.check,
           kernel.config_features, kernel.agrees]
    for impl in kernel.implementations.values():
        fns += [impl.fn, impl.supports, *((impl.space.default, impl.space.fits) if impl.space else ())]
    todo = [m for fn in fns if fn is not None and (m := getattr(inspect.unwrap(fn), "__module__", None))]
    found: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in found or name == __name__ or path is None:
            continue
        found[name] = path
        todo += _imports(name, path)
    return sorted(found.items())


@functools.cache
def _module_file(name: str) -> Path | None:
    """The .py file of module `name` (None: not a module), found from its top-level package's folder
    without importing it or its parents: a Triton module imported too early is built wrongly."""
    top, *parts = name.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:  # a single-file module, or none
        return Path(spec.origin) if spec and not parts and spec.origin and spec.origin.endswith(".py") else None
    base = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    return next((p for p in (base.with_suffix(".py") if parts else None, base / "__init__.py") if p and p.is_file()),
                None)


def _imports(name: str, path: Path) -> list[str]:
    """The modules of `name`'s own top-level package that it (at `path`) imports, anywhere in the file.
    Others are never looked up: a module outside the package is not the kernel's code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours = lambda m: m.partition(".")[0] == name.partition(".")[0]  # noqa: E731
    out = []
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names if ours(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            if ours(base):  # `from base import x`: x is a submodule of base, or a name base defines
                out += [base, *(f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}"))]
    return out


def grid_features(tiles: float, units: int) -> dict[str, float]:
    """How `tiles` independent programs fill `units` SMs or cores: waves, and the last wave's fill."""
    units = max(int(units), 1)
    waves = -(-int(max(tiles, 1)) // units)
    return {"tiles": float(tiles), "waves": float(waves), "wave_fill": float(tiles) / (waves * units)}


KERNELS: dict[str, Kernel] = {}
_preference: contextvars.ContextVar[KernelPreference] = contextvars.ContextVar(
    "adaptc_kernel_preference", default=KernelPreference.AUTO
)


def check_problem(p: dict[str, Any], sizes: dict[str, int], flags: tuple[str, ...] = ()) -> None:
    """ValueError saying what is wrong with a problem given by hand (`adaptc tune --problem`): a size
    missing, not a whole number or under its least value (`sizes`: name -> least value), a flag that
    is not true/false, or a name the kernel does not take."""
    for name, least in sizes.items():
        v = p.get(name)
        if v is None:
            raise ValueError(f"lacks {name!r}")
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{name} must be a whole number >= {least}, got {v!r}")
    for name in flags:
        if name in p and not isinstance(p[name], bool):
            raise ValueError(f"{name} must be true or false, got {p[name]!r}")
    unknown = sorted(set(p) - set(sizes) - set(flags) - {"dtype"})
    if unknown:
        raise ValueError(f"unknown name(s) {', '.join(unknown)}; this kernel takes {', '.join([*sizes, *flags])}")


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


# Tuned configs by (kernel, implementation, device type, problem). The tuner fills this; compile and
# load install a source (the tuning cache, adaptc.tuner.session.install_cache_source) consulted once
# per new problem; kernels fall back to their default.
_CONFIGS: dict[tuple, dict[str, Any] | None] = {}
_config_source: list[Callable[[str, str, dict[str, Any], str], dict[str, Any] | None]] = []
_generation = [0]  # bumped whenever a memoised config may change: callers may memoise config_for on it


def configs_generation() -> int:
    return _generation[0]


def clear_configs() -> None:
    """Forget every memoised config (tests; a new cache source does this too)."""
    _CONFIGS.clear()
    _generation[0] += 1


def _key(kernel: str, impl: str, problem: dict[str, Any], device_type: str) -> tuple:
    return kernel, impl, device_type, tuple(sorted(problem.items()))


def config_for(kernel: str, impl: str, problem: dict[str, Any], device_type: str,
               default: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The tuned config for this problem, else `default()`."""
    key = _key(kernel, impl, problem, device_type)
    if key not in _CONFIGS:
        _CONFIGS[key] = next((c for src in _config_source if (c := src(kernel, impl, problem, device_type))), None)
    cfg = _CONFIGS[key]
    return dict(cfg) if cfg is not None else default()


def set_config(kernel: str, impl: str, problem: dict[str, Any], device_type: str, config: dict[str, Any]) -> None:
    _CONFIGS[_key(kernel, impl, problem, device_type)] = dict(config)
    _generation[0] += 1


def set_config_source(source: Callable[[str, str, dict[str, Any], str], dict[str, Any] | None] | None) -> None:
    """Where config_for looks for configs it has not seen (None: nowhere). Forgets what it memoised."""
    _config_source[:] = [source] if source is not None else []
    clear_configs()


def config_source() -> Callable[[str, str, dict[str, Any], str], dict[str, Any] | None] | None:
    """The installed config source, or None."""
    return _config_source[0] if _config_source else None


# Kernel calls seen while tracing, by (kernel, implementation, problem): what compile tunes.
_trace: contextvars.ContextVar[dict | None] = contextvars.ContextVar("adaptc_kernel_trace", default=None)


@contextlib.contextmanager
def trace_calls():
    """Collect one argument tuple per distinct (kernel, implementation, problem) called in the block."""
    calls: dict[tuple, tuple[str, str, tuple]] = {}
    token = _trace.set(calls)
    try:
        yield calls
    finally:
        _trace.reset(token)


def tracing_calls() -> bool:
    return _trace.get() is not None


def kernel_preference_now() -> KernelPreference:
    return _preference.get()


def note_call(kernel: Kernel, impl: str, args: tuple) -> None:
    calls = _trace.get()
    if calls is not None and impl in kernel.implementations:
        calls.setdefault(_key(kernel.name, impl, kernel.problem(*args), args[0].device.type), (kernel.name, impl, args))
