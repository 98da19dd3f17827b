"""What `adaptc.load` accepts from a file it did not write: nothing in it may run code, touch files or
ask for memory its own bytes do not justify.

torch.export.load is not safe on its own: it unpickles members (`use_pickle` weights and constants and the
legacy weights file with weights_only=False, opaque objects with pickle.loads, sample inputs after a
weights_only failure), loads `data/aotinductor/` shared libraries, `exec`s the program's `guards_code`,
`sympify`s (evals) symbolic sizes and splices attribute and input names into generated Python. So
`read_program` checks the archive's members itself (guards only as size checks, sizes only as sympy
constructors, names only as dotted identifiers) and hands torch a repacked archive of exactly the members
it checked; `check_graph` then admits only the ops adaptc's own graphs use. `check_hf_config` keeps a saved
Hugging Face config from choosing downloaded code (Hub kernels, remote modeling files) or absurd sizes.
"""
from __future__ import annotations

import ast
import io
import json
import math
import operator
import re
import zipfile
from typing import Any

import torch

from ..errors import SaveLoadError

MANIFEST_LIMIT = 16 << 20  # adaptc's manifests are kilobytes; a bigger one is a zip bomb or not ours
INFLATE_LIMIT = 100  # deflate never shrinks weights 100x; an adaptc file is written uncompressed anyway
SIZE_LIMIT = 1 << 24  # no config size (vocab, width, positions) of a real model comes near 16M
COUNT_LIMIT = 4096  # layers, heads, experts
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")  # "layers.0.weight"; never quotes or code
_SYMBOL = re.compile(r"[a-z]+[0-9]*")  # s0, u3: the symbols torch.export names sizes with


def check_member(info: zipfile.ZipInfo, limit: int | None = None) -> None:
    """Refuse a zip member before reading it when it inflates past `limit` or far past its stored bytes."""
    if limit is not None and info.file_size > limit:
        raise SaveLoadError(f"{info.filename} inside it is too large ({info.file_size / 1e6:.0f} MB; "
                            f"adaptc's are under {limit >> 20} MB)")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > INFLATE_LIMIT * info.compress_size + (1 << 20):
        raise SaveLoadError(f"{info.filename} inside it inflates {info.compress_size} bytes to {info.file_size} "
                            "(a zip bomb, not a file adaptc.save wrote)")


# --- program.pt2 ---------------------------------------------------------------------------------------

_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
          "models/model.json", "data/sample_inputs/model.pt", "data/weights/model_weights_config.json",
          "data/constants/model_constants_config.json"}
_PAYLOADS = {"data/weights/model_weights_config.json": ("data/weights/", "weight_"),
             "data/constants/model_constants_config.json": ("data/constants/", "tensor_")}


def read_program(data: bytes) -> Any:
    """The ExportedProgram in a torch.export.save archive, read without running anything from it."""
    files = _archive_members(data)
    records = {r for config_name, (folder, prefix) in _PAYLOADS.items()
               for r in _check_payloads(files, config_name, folder, prefix)}
    unexpected = sorted(set(files) - _FIXED - records)  # e.g. data/weights/model.pt, torch's legacy pickle
    if unexpected:
        raise SaveLoadError(f"program.pt2 inside it holds {unexpected[0]!r}, which adaptc never writes "
                            "(torch would load it as code or pickle)")
    try:  # torch retries a failed weights_only read with weights_only=False: never let it fail
        inputs = torch.load(io.BytesIO(files["data/sample_inputs/model.pt"]), weights_only=True)
    except Exception:
        raise SaveLoadError("program.pt2 inside it has sample inputs that are not plain tensors "
                            "(a pickle; refused: unpickling runs code from the file)") from None
    if not isinstance(inputs, (tuple, dict)):
        raise SaveLoadError("program.pt2 inside it has sample inputs that are not a tuple")
    program = json.loads(files["models/model.json"])
    for guard in program.get("guards_code") or []:
        _check_guard(guard)
    _check_program_json(program)
    buf = io.BytesIO()  # torch reads exactly the members checked above, not whatever its own zip reader finds
    with zipfile.ZipFile(buf, "w") as zf:
        for name, member in files.items():
            zf.writestr(f"archive/{name}", member)
    del files
    buf.seek(0)
    return torch.export.load(buf)


def _archive_members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        if not infos:
            raise SaveLoadError("program.pt2 inside it is empty")
        root = infos[0].filename.split("/", 1)[0] + "/"
        files: dict[str, bytes] = {}
        for info in infos:
            name = info.filename[len(root):]
            if not info.filename.startswith(root) or name in files:
                raise SaveLoadError(f"program.pt2 inside it has a stray or repeated member {info.filename!r}")
            check_member(info)
            files[name] = zf.read(info)
    missing = sorted(_FIXED - set(files))
    if missing:
        raise SaveLoadError(f"program.pt2 inside it has no {missing[0]} (not a torch.export.save archive)")
    return files


def _check_payloads(files: dict[str, bytes], config_name: str, folder: str, prefix: str) -> set[str]:
    """Every weight / constant is a raw tensor record: no pickle, no object, no size its bytes lack.
    Returns the members the config refers to."""
    records = set()
    try:
        entries = json.loads(files[config_name])["config"]
        for fqn, meta in entries.items():
            what = f"program.pt2 inside it has {config_name.split('/')[1][:-1]} {fqn[:60]!r}"
            path_name = meta["path_name"]
            if meta.get("use_pickle") or not (isinstance(path_name, str) and _IDENT.fullmatch(path_name)
                                              and path_name.startswith(prefix)):
                raise SaveLoadError(f"{what} stored as a pickle or object ({path_name!r}); refused: "
                                    "unpickling runs code from the file")
            if not _FQN.fullmatch(fqn):
                raise SaveLoadError(f"{what}, which is not a dotted attribute name")
            record = files.get(folder + path_name)
            if record is None:
                raise SaveLoadError(f"{what} but no {folder + path_name}")
            sizes = [s["as_int"] for s in meta["tensor_meta"]["sizes"]]
            if not all(type(s) is int and 0 <= s for s in sizes) or (math.prod(sizes) and not record):
                raise SaveLoadError(f"{what} with sizes {sizes} that its {len(record)} bytes do not hold")
            records.add(folder + path_name)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise SaveLoadError(f"program.pt2 inside it has a damaged {config_name} ({type(exc).__name__}: {exc})") from None
    return records


# Keys whose strings become Python identifiers or attribute paths in the module torch generates.
_NAME_KEYS = {"name", "as_name", "parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name",
              "target", "fqn", "forward_arg_names"}


def _check_program_json(doc: Any, key: str = "") -> None:
    """Symbolic sizes are sympy expressions (sympify evals them) and names are spliced into generated code:
    both must be what torch.export writes, nothing that could be Python."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "metadata":  # debug text (stack traces), kept as strings; never code
                continue
            if k == "expr_str":
                _check_expr(v)
            elif k == "range_constraints" and isinstance(v, dict) and not all(_SYMBOL.fullmatch(s) for s in v):
                raise SaveLoadError("program.pt2 inside it has a range constraint on something other than a size symbol")
            elif k == "tensor_values" and isinstance(v, dict) and not all(_IDENT.fullmatch(n) for n in v):
                raise SaveLoadError("program.pt2 inside it names a value with something other than an identifier")
            _check_program_json(v, k)
    elif isinstance(doc, list):
        for v in doc:
            _check_program_json(v, key)
    elif isinstance(doc, str) and key in _NAME_KEYS and doc and not _FQN.fullmatch(doc):
        raise SaveLoadError(f"program.pt2 inside it has a {key} {doc[:60]!r} that is not a dotted name "
                            "(torch would splice it into Python source)")


_SYMPY_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "true", "false", "oo", "zoo", "nan", "Infinity",
    "NegativeInfinity", "IntInfinity", "NegativeIntInfinity", "One", "Zero", "NegativeOne", "Half",
    "Piecewise", "ExprCondPair", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv",
    "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
}
_EXPR_NODES = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp,
               ast.Compare, ast.BoolOp, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)


def _small_int(v: Any) -> bool:
    return isinstance(v, (bool, float)) or (isinstance(v, int) and abs(v) < 1 << 64)


def _only(text: Any, nodes: tuple, node_ok: Any) -> bool:
    """Whether `text` parses as one Python expression made only of `nodes` (never `**`: a huge power
    is a denial of service) each passing `node_ok`."""
    try:
        tree = ast.parse(text, mode="eval") if isinstance(text, str) and len(text) < 10_000 else None
    except SyntaxError:
        return False
    return tree is not None and all(isinstance(n, nodes) and not isinstance(n, ast.Pow) and node_ok(n)
                                    for n in ast.walk(tree))


def _expr_node_ok(node: ast.AST) -> bool:
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and all(k.arg for k in node.keywords)
    if isinstance(node, ast.Name):
        return node.id in _SYMPY_NAMES or bool(_SYMBOL.fullmatch(node.id))
    if isinstance(node, ast.Constant):
        return _small_int(node.value) or (isinstance(node.value, str) and bool(_SYMBOL.fullmatch(node.value)))
    return True


def _check_expr(text: Any) -> None:
    """A sympy expression as torch.export prints it (`Symbol('s0', positive=True, integer=True)`,
    `Add(...)`): calls of sympy constructors by name on numbers and symbol names, nothing else."""
    if not _only(text, _EXPR_NODES, _expr_node_ok):
        raise SaveLoadError(f"program.pt2 inside it has a symbolic size {str(text)[:80]!r} that is not a sympy "
                            "expression (torch would eval it)")


_GUARD_NODES = (ast.Expression, ast.Compare, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Subscript, ast.Attribute,
                ast.Call, ast.Name, ast.Load, ast.Constant, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)


def _guard_node_ok(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "L"
    if isinstance(node, ast.Attribute):
        return node.attr in ("size", "stride", "storage_offset", "dim")
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Attribute) and not node.keywords
    if isinstance(node, ast.Constant):
        return _small_int(node.value) or (isinstance(node.value, str) and bool(_IDENT.fullmatch(node.value)))
    return True


def _check_guard(text: Any) -> None:
    """guards_code is Python that ExportedProgram.module() execs: only comparisons of input sizes as
    torch.export writes them (`L['input_ids'].size()[1] <= 64`) are let through."""
    if not _only(text, _GUARD_NODES, _guard_node_ok):
        raise SaveLoadError(f"program.pt2 inside it has a guard {str(text)[:80]!r} that is not a size check "
                            "(torch would exec it)")


# --- the deserialized graph ----------------------------------------------------------------------------

_NAMESPACES = {"aten", "prims", "adaptc"}
# aten ops that reach files or raw memory: from_file maps any path (shared=True writes it), set_ swaps in
# arbitrary storage, _print writes to stdout, record_stream / _nested_* views trust offsets.
_REFUSED_OPS = {"from_file", "set", "set_", "_print", "record_stream"}
_HIGHER_ORDER = {"cond", "while_loop", "wrap_with_set_grad_enabled", "wrap_with_autocast"}
_PLAIN_FUNCTIONS = {operator.getitem, math.ceil, math.floor, math.sqrt, math.trunc}


def check_graph(program: Any) -> None:
    """Every call in the program (and its subgraphs) is an aten/prims compute op, an adaptc op, or the
    symbolic-size arithmetic torch.export itself emits."""
    from torch._export.serde.serialize import _SYM_OPS

    for gm in program.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "placeholder", "output", "get_attr"):
                raise SaveLoadError(f"program.pt2 inside it has a {node.op} node; adaptc graphs have none")
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                name = target._opname
                ok = (target.namespace in _NAMESPACES and name not in _REFUSED_OPS and not name.startswith("_nested")
                      and not any("Storage" in str(a.type) for a in target._schema.arguments))
                label = f"{target.namespace}::{name}"
            elif isinstance(target, torch._ops.HigherOrderOperator):
                ok, label = target.name() in _HIGHER_ORDER, f"higher_order::{target.name()}"
            else:
                ok, label = target in _SYM_OPS or target in _PLAIN_FUNCTIONS, getattr(target, "__name__", str(target))
            if not ok:
                raise SaveLoadError(f"program.pt2 inside it calls {label}, which reaches files, storage or code "
                                    "outside adaptc's ops; refused")


# --- Hugging Face configs ------------------------------------------------------------------------------

_ATTENTION = {None, "eager", "sdpa", "flex_attention", "paged|eager", "adaptc", "adaptc_sparse"}
_EXPERTS = {None, "eager", "batched_mm", "grouped_mm"}
_CODE_KEYS = {"auto_map", "quantization_config", "trust_remote_code", "custom_pipelines"}
_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "num_attention_heads", "num_key_value_heads", "n_head",
           "num_experts", "num_local_experts", "num_experts_per_tok", "n_routed_experts", "n_shared_experts")


def check_hf_config(config: Any, where: str = "hf_config") -> None:
    """Values that choose code must name local implementations; sizes must be ints a real model has.
    (flash_attention_* are refused too: without flash_attn installed transformers fetches a Hub kernel.)"""
    if not isinstance(config, dict):
        raise SaveLoadError(f"{where} is {type(config).__name__}, not a JSON object")
    for key, value in config.items():
        at = f"{where}.{key}"
        if key in _CODE_KEYS and value:
            raise SaveLoadError(f"{at} is set: it would load code (remote modeling files, quantizer kernels); refused")
        bare = key.strip("_").removesuffix("_internal")
        if bare in ("attn_implementation", "experts_implementation"):
            allowed = _ATTENTION if bare.startswith("attn") else _EXPERTS
            for choice in value.values() if isinstance(value, dict) else [value]:
                if choice not in allowed:
                    raise SaveLoadError(f"{at} is {choice!r}: not one of the local implementations "
                                        f"{sorted(c for c in allowed if c)} (a name like org/kernel downloads code)")
        elif isinstance(value, dict):
            check_hf_config(value, at)
        elif key in _COUNTS or key.endswith(("_size", "_dim")) or key in ("max_position_embeddings", "n_positions",
                                                                           "n_embd", "n_inner", "d_model"):
            limit = COUNT_LIMIT if key in _COUNTS else SIZE_LIMIT
            for v in value if isinstance(value, list) else [value]:
                if v is not None and not (type(v) is int and 0 <= v <= limit):
                    raise SaveLoadError(f"{at} is {v!r}: not a size (an int from 0 to {limit})")
