"""save/load without executing code from the file.

A `.adaptc` file is a zip: `manifest.json` (format version, report, plan, how to rebuild) and either
`program.pt2` (a torch.export program: graph as data) or `weights.pt` (tensors only, read with
`weights_only=True`) plus a Hugging Face config from which the architecture is rebuilt. The model
class is looked up by name in `transformers` and must be a PreTrainedModel: nothing else is loaded.
"""
from __future__ import annotations

import functools
import io
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
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
            os.fchmod(fh.fileno(), 0o644)  # mkstemp's 0600 would keep the file from the people it is for
            zf.writestr("manifest.json", json.dumps(manifest, indent=1, default=str))
            for name, data in files.items():
                zf.writestr(name, data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path: str | os.PathLike, map_location: Any = None) -> nn.Module:
    from .. import kernels  # noqa: F401  (the adaptc:: ops a saved graph calls)
    from ..tuner import session  # noqa: F401  (tuned configs come from the cache)

    try:
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(zf.read("manifest.json"))
            if not isinstance(manifest, dict):
                raise SaveLoadError(f"{path}: manifest.json is not a JSON object (not a file adaptc.save wrote)")
            if manifest.get("format") != "adaptc" or manifest.get("format_version") != FORMAT_VERSION:
                raise SaveLoadError(f"{path}: format version {manifest.get('format_version')} "
                                    f"(this adaptc reads {FORMAT_VERSION})")
            state = CompiledState(manifest["report"], manifest["plan"], manifest["config"])
            kind = manifest.get("kind")
            if kind == "exported_program":
                program = _read_member(path, zf, "program.pt2", torch.export.load, "a torch.export.save archive")
                module: nn.Module = CompiledModule(program.module(), signature=None)
                module._program = program
            elif kind == "hf_blocks":
                read = functools.partial(torch.load, map_location=map_location, weights_only=True)
                weights = _read_member(path, zf, "weights.pt", read, "tensors written by torch.save")
                module = _rebuild_hf(manifest, weights)
            else:
                raise SaveLoadError(f"{path}: unknown kind {kind!r}")
    except SaveLoadError:
        raise
    except FileNotFoundError:
        raise SaveLoadError(f"{path}: no such file") from None
    except OSError as exc:
        raise SaveLoadError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, RuntimeError, ValueError) as exc:
        raise SaveLoadError(f"{path}: not a readable adaptc file ({type(exc).__name__}: {exc})") from None
    from ..inductor import reapply

    reapply(module, state.report.get("inductor", {}))  # what compile handed to Inductor, lazily again
    return attach(module, state)


def _read_member(path: str | os.PathLike, zf: zipfile.ZipFile, name: str, read: Any, what: str) -> Any:
    """`read` applied to member `name`; whatever it raises on damaged bytes becomes one line naming the
    member. torch's own messages are left out: they suggest weights_only=False, which would run code from
    the file, and torch.export logs a traceback first (silenced here)."""
    data = zf.read(name)
    log = logging.getLogger("torch.export")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return read(io.BytesIO(data))
    except Exception as exc:
        raise SaveLoadError(f"{path}: {name} inside it is damaged or not {what} ({type(exc).__name__})") from None
    finally:
        log.setLevel(level)


def _is_hf_model(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(module, PreTrainedModel)


def _rebuild_hf(manifest: dict[str, Any], weights: dict[str, torch.Tensor]) -> nn.Module:
    import transformers

    from ..passes import registry
    from ..passes._base import ModuleEdit

    cls = getattr(transformers, manifest["model_class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SaveLoadError(f"model class {manifest['model_class']!r} is not a transformers model")
    config_dict = dict(manifest["hf_config"])
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = cls(config).eval()
    edit = ModuleEdit(model)
    for pass_name, sites in manifest["plan"].items():
        rebuild = getattr(registry()[pass_name], "rebuild", None)
        if rebuild is None:
            raise SaveLoadError(f"pass {pass_name!r} cannot be re-applied on load")
        for path, site_plan in sites.items():
            try:  # the plan is data from the file: a bad one is a load error, not a traceback from a pass
                edit.replace(path, rebuild(edit.root.get_submodule(path), site_plan, edit.root))
            except SaveLoadError as exc:
                raise SaveLoadError(f"cannot re-apply {pass_name!r} at {path!r}: {exc}") from None
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise SaveLoadError(f"cannot re-apply {pass_name!r} at {path!r}: {type(exc).__name__}: {exc}") from None
    model = edit.root
    model.load_state_dict(weights, strict=True)
    return model
