"""save/load without executing code from the file.

A `.adaptc` file is a zip: `manifest.json` (format version, report, plan, how to rebuild) and either
`program.pt2` (a torch.export program: graph as data) or `weights.pt` (tensors only, read with
`weights_only=True`) plus a Hugging Face config from which the architecture is rebuilt. The model
class is looked up by name in `transformers` and must be a PreTrainedModel: nothing else is loaded.
Pass configs in the manifest come back only as adaptc's own config classes (adaptc.passes.load_config),
and each pass re-applies its saved site plans through its `rebuild`.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
import tempfile
import zipfile
from typing import Any

import torch
from torch import nn

from .._version import VERSION
from ..errors import SaveLoadError
from . import trust
from .module import CompiledModule, CompiledState, attach, state_of

FORMAT_VERSION = 1


def save(module: nn.Module, path: str | os.PathLike) -> None:
    state = state_of(module)
    manifest: dict[str, Any] = {
        "format": "adaptc", "format_version": FORMAT_VERSION, "adaptc_version": VERSION,
        "report": state.report, "plan": state.plan, "config": state.config,
    }
    files: dict[str, bytes] = {}
    program = getattr(module, "_program", None)
    if isinstance(module, CompiledModule) and program is not None:
        manifest["kind"] = "exported_program"
        buf = io.BytesIO()
        torch.export.save(program, buf)
        files["program.pt2"] = buf.getvalue()
    elif _is_hf_model(module):
        from ..passes import registry

        unsaveable = [name for name in state.plan if name in registry() and not registry()[name].saveable]
        if unsaveable:
            raise SaveLoadError(f"cannot save {type(module).__name__}: pass {unsaveable[0]!r} rewrote it at block "
                                "granularity and cannot be re-applied from data on load (compile without it, "
                                "or with a whole-graph capture)")
        manifest["kind"] = "hf_blocks"
        manifest["model_class"] = type(module).__name__
        manifest["hf_config"] = module.config.to_dict()
        buf = io.BytesIO()
        torch.save(module.state_dict(), buf)
        files["weights.pt"] = buf.getvalue()
    else:
        raise SaveLoadError(
            f"cannot save {type(module).__name__} without pickling code: it has no exported graph "
            f"(capture: {state.report.get('capture', {}).get('reason', 'n/a')}) and is not a Hugging Face model"
        )
    # Write next to the target and rename: an interrupted save never leaves a half file at `path`.
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:  # the errors name the user's path, not the temporary file beside it
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    except OSError as exc:
        missing = "" if os.path.isdir(folder) else f" (no folder {folder})"
        raise SaveLoadError(f"cannot write {path}: {exc.strerror or exc}{missing}") from None
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
            os.fchmod(fh.fileno(), 0o644)  # mkstemp's 0600 would keep the file from the people it is for
            zf.writestr("manifest.json", json.dumps(manifest, indent=1, default=str))
            for name, data in files.items():
                zf.writestr(name, data)
        os.replace(tmp, path)
    except BaseException as exc:
        os.unlink(tmp)
        if isinstance(exc, OSError):
            raise SaveLoadError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def load(path: str | os.PathLike, map_location: Any = None) -> nn.Module:
    from .. import kernels  # noqa: F401  (the adaptc:: ops a saved graph calls)
    from ..tuner.session import install_cache_source

    install_cache_source()  # the loaded module's kernels read their tuned configs from the cache
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(_read(zf, "manifest.json", trust.MANIFEST_LIMIT))
            if not isinstance(manifest, dict):
                raise SaveLoadError("manifest.json is not a JSON object (not a file adaptc.save wrote)")
            if manifest.get("format") != "adaptc" or manifest.get("format_version") != FORMAT_VERSION:
                raise SaveLoadError(f"format version {manifest.get('format_version')} (this adaptc reads {FORMAT_VERSION})")
            state = CompiledState(*(_field(manifest, name) for name in ("report", "plan", "config")))
            configs = _pass_configs(manifest["config"])
            kind = manifest.get("kind")
            if kind == "exported_program":
                what = "a torch.export.save archive"
                program = _member("program.pt2", what, trust.read_program, _read(zf, "program.pt2"))
                trust.check_graph(program)
                module: nn.Module = CompiledModule(_member("program.pt2", what, program.module), signature=None)
                module._program = program
            elif kind == "hf_blocks":
                data = io.BytesIO(_read(zf, "weights.pt"))
                weights = _member("weights.pt", "tensors written by torch.save", lambda: torch.load(
                    data, map_location=map_location, weights_only=True))
                trust.check_hf_config(manifest.get("hf_config"))
                module = _rebuild_hf(manifest, weights, configs)
            else:
                raise SaveLoadError(f"unknown kind {kind!r}")
    except SaveLoadError as exc:  # every message starts with the file it is about
        raise SaveLoadError(f"{path}: {exc}") from None
    except FileNotFoundError:
        raise SaveLoadError(f"{path}: no such file") from None
    except OSError as exc:
        raise SaveLoadError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, RuntimeError, ValueError) as exc:
        message = " ".join(str(exc).split())[:300]  # torch's messages span lines (load_state_dict's lists keys)
        raise SaveLoadError(f"{path}: not a readable adaptc file ({type(exc).__name__}: {message})") from None
    from ..inductor import reapply

    reapply(module, state.report.get("inductor", {}))  # what compile handed to Inductor, lazily again
    return attach(module, state)


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """The report a saved file holds, without rebuilding its model (`adaptc report FILE`)."""
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(_read(zf, "manifest.json", trust.MANIFEST_LIMIT))
    except FileNotFoundError:
        raise SaveLoadError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
        raise SaveLoadError(f"{path}: not a readable adaptc file ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "adaptc":
        raise SaveLoadError(f"{path}: not a file adaptc.save wrote")
    try:
        return _field(manifest, "report")
    except SaveLoadError as exc:
        raise SaveLoadError(f"{path}: {exc}") from None


def _pass_configs(config: Any) -> dict[str, Any]:
    """The saved pass configs by pass name, built only as adaptc's own config classes: data from the
    file never names a class to construct."""
    from ..passes import load_config

    saved = config.get("pass_configs", {}) if isinstance(config, dict) else None
    if not isinstance(saved, dict):
        raise SaveLoadError("its compile config is not a JSON object with pass_configs")
    try:
        return {name: load_config(data) for name, data in saved.items()}
    except ValueError as exc:
        raise SaveLoadError(f"a pass config in it cannot be read: {exc}") from None


def _read(zf: zipfile.ZipFile, name: str, limit: int | None = None) -> bytes:
    info = zf.getinfo(name)
    trust.check_member(info, limit)
    return zf.read(info)


def _field(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    value = manifest[name]
    if not isinstance(value, dict) or (name == "plan" and not all(isinstance(v, dict) for v in value.values())):
        raise SaveLoadError(f"manifest.json has a {name} that is not a JSON object"
                            + (" of pass -> {site: plan}" if name == "plan" else ""))
    return value


def _member(name: str, what: str, fn: Any, *args: Any) -> Any:
    """`fn(*args)` on member `name`; whatever it raises on damaged bytes becomes one line naming the
    member. torch's own messages are left out: they suggest weights_only=False, which would run code from
    the file, and torch.export logs a traceback first (silenced here)."""
    log = logging.getLogger("torch.export")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return fn(*args)
    except SaveLoadError:
        raise
    except Exception as exc:
        raise SaveLoadError(f"{name} inside it is damaged or not {what} ({type(exc).__name__})") from None
    finally:
        log.setLevel(level)


def _is_hf_model(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(module, PreTrainedModel)


def _rebuild_hf(manifest: dict[str, Any], weights: dict[str, torch.Tensor], configs: dict[str, Any]) -> nn.Module:
    import transformers

    from ..errors import AdaptcError
    from ..passes import registry
    from ..passes._base import ModuleEdit

    name = manifest.get("model_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SaveLoadError(f"model class {name!r} is not a transformers model")
    config_dict = dict(manifest["hf_config"])
    model_type = config_dict.pop("model_type", None)
    if not (isinstance(model_type, str) and model_type in transformers.CONFIG_MAPPING):
        raise SaveLoadError(f"hf_config.model_type {model_type!r} is not a model type transformers knows")
    try:  # the config is data from the file: a bad one is a load error, not transformers' traceback
        config = transformers.AutoConfig.for_model(model_type, **config_dict)
        if not isinstance(config, cls.config_class):
            raise SaveLoadError(f"model class {name} takes a {cls.config_class.__name__}, "
                                f"hf_config is a {type(config).__name__}")
        with torch.device("meta"):  # the size the config asks for, before allocating any of it
            probe = cls(config)
    except SaveLoadError:
        raise
    except Exception as exc:
        line = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
        raise SaveLoadError(f"hf_config does not build a {name}: {type(exc).__name__}: {line[:200]}") from None
    if not (isinstance(weights, dict) and all(isinstance(t, torch.Tensor) for t in weights.values())):
        raise SaveLoadError("weights.pt inside it is not a dict of tensors")
    need = sum(t.numel() * t.element_size() for t in itertools.chain(probe.parameters(), probe.buffers()))
    have = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in weights.values()}.values())
    del probe
    if need > 2 * have + (64 << 20):
        raise SaveLoadError(f"hf_config asks for a {need / 1e9:.3g} GB {name}, the file's weights hold "
                            f"{have / 1e9:.3g} GB; refused before allocating")
    model = cls(config).eval()
    edit = ModuleEdit(model)
    for pass_name, sites in manifest["plan"].items():
        cls = registry().get(pass_name)
        if cls is None:
            raise SaveLoadError(f"plan names pass {pass_name!r}, which this adaptc does not have")
        if not cls.saveable:
            raise SaveLoadError(f"pass {pass_name!r} cannot be re-applied on load")
        try:
            p = cls(configs.get(pass_name))
        except AdaptcError as exc:
            raise SaveLoadError(f"the config saved for {pass_name!r} does not fit it: {exc}") from None
        for path, site_plan in sites.items():
            try:  # the plan is data from the file: a bad one is a load error, not a traceback from a pass
                edit.replace(path, p.rebuild(edit.root.get_submodule(path), p.plan_class.from_dict(site_plan), edit.root))
            except SaveLoadError as exc:
                raise SaveLoadError(f"cannot re-apply {pass_name!r} at {path!r}: {exc}") from None
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise SaveLoadError(f"cannot re-apply {pass_name!r} at {path!r}: {type(exc).__name__}: {exc}") from None
    model = edit.root
    model.load_state_dict(weights, strict=True)
    return model
