"""A .adaptc file from someone else must never run code or touch files: each attack here is a real file
(a small program saved by adaptc, then members rewritten) and must end in one SaveLoadError line with the
marker file never created."""
import io
import json
import pickle
import re
import zipfile

import pytest
import torch
from torch import nn

import adaptc
from adaptc.runtime.module import CompiledState, attach

PT2 = "program.pt2"


class Touch:
    """Unpickling it creates `path` (what a hostile pickle would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def write_zip(path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for n, d in files.items():
            zf.writestr(n, d)


def rewrite_program(path, edit) -> None:
    """`edit(files)` changes the members of program.pt2 (names without the archive/ prefix) in place."""
    outer = members(path)
    inner = {n.split("/", 1)[1]: d for n, d in members(io.BytesIO(outer[PT2])).items()}
    edit(inner)
    buf = io.BytesIO()
    write_zip(buf, {f"archive/{n}": d for n, d in inner.items()})
    outer[PT2] = buf.getvalue()
    write_zip(path, outer)


def edit_json(files, name, change) -> None:
    doc = json.loads(files[name])
    change(doc)
    files[name] = json.dumps(doc).encode()


def saved_program(tmp_path, dynamic=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval()
    fast = adaptc.compile(model, example_inputs=(torch.randn(2, 3),))
    path = tmp_path / "evil.adaptc"
    adaptc.save(fast, path)
    return path


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def pickled_sample_inputs(files, marker):  # torch.export.load retries it with weights_only=False
    files["data/sample_inputs/model.pt"] = torch_bytes(((Touch(marker),), {}))


def pickled_weight(files, marker):  # "use_pickle": true is read with weights_only=False
    edit_json(files, "data/weights/model_weights_config.json",
              lambda c: c["config"]["0.weight"].update(use_pickle=True))
    files["data/weights/weight_0"] = torch_bytes(Touch(marker))


def pickled_constant(files, marker):  # an "opaque object" constant is pickle.loads'ed
    from torch.export.pt2_archive.constants import OPAQUE_OBJ_FILENAME_PREFIX

    name = f"{OPAQUE_OBJ_FILENAME_PREFIX}0"
    edit_json(files, "data/constants/model_constants_config.json", lambda c: c["config"].update(
        {"obj": {"path_name": name, "is_param": False, "use_pickle": True, "tensor_meta": None}}))
    files[f"data/constants/{name}"] = pickle.dumps(Touch(marker))


def legacy_weights(files, marker):  # torch still reads data/weights/model.pt, retrying with weights_only=False
    files["data/weights/model.pt"] = torch_bytes(Touch(marker))


def guard_code(files, marker):  # guards_code is exec'd by ExportedProgram.module()
    edit_json(files, "models/model.json", lambda p: p.update(
        guards_code=["L['input'].size()[1] == 3", f"__import__('pathlib').Path({str(marker)!r}).touch() is None"]))


def guard_attribute(files, marker):  # a size check may not reach past the input's sizes
    edit_json(files, "models/model.json", lambda p: p.update(
        guards_code=[f"L['input'].__class__.__base__ is None or open({str(marker)!r}, 'w')"]))


def sympy_expression(files, marker):  # symbolic sizes go through sympy.sympify, which evals
    text = files["models/model.json"].decode()
    expr = re.search(r'"expr_str": ("[^"]*")', text).group(1)
    payload = f"{json.loads(expr)} + 0*len(str(open({str(marker)!r}, 'w')))"
    files["models/model.json"] = text.replace(expr, json.dumps(payload), 1).encode()


def get_attr_name(files, marker):  # a weight's name is spliced into the Python source of the unlifted module
    where = str(marker).replace(".", "\\x2e")  # a "." would split the name
    bad = (f'w", None) or exec("open({where!r}\\x2c \'w\')") or getattr(torch, "ones")(3, 3) '
           'if 1 else getattr(self, "')
    text = files["models/model.json"].decode()
    files["models/model.json"] = text.replace('"0.weight"', json.dumps(f"0.{bad}")).encode()
    edit_json(files, "data/weights/model_weights_config.json",
              lambda c: c["config"].update({f"0.{bad}": c["config"].pop("0.weight")}))


def aot_library(files, marker):  # data/aotinductor/ members are loaded as a compiled shared library
    files["data/aotinductor/model/model.so"] = b"\x7fELF not really"


ARCHIVE_ATTACKS = [pickled_sample_inputs, pickled_weight, pickled_constant, legacy_weights, guard_code,
                   guard_attribute, sympy_expression, get_attr_name, aot_library]


@pytest.mark.parametrize("attack", ARCHIVE_ATTACKS, ids=lambda a: a.__name__)
def test_program_archive_that_would_run_code_is_refused(tmp_path, attack):
    path = saved_program(tmp_path)
    marker = tmp_path / "ran"
    rewrite_program(path, lambda files: attack(files, marker))
    with pytest.raises(adaptc.SaveLoadError) as info:
        module = adaptc.load(path)
        module(torch.randn(2, 3))
    assert "\n" not in str(info.value) and "evil.adaptc" in str(info.value)
    assert not marker.exists()


def graph_with(tmp_path, add_nodes):
    """A saved program whose graph `add_nodes(graph, output_node)` extended before torch.export.save."""
    path = saved_program(tmp_path)
    program = torch.export.export(nn.Sequential(nn.Linear(3, 3)).eval(), (torch.randn(2, 3),))
    graph = program.graph
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        add_nodes(graph, out)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    files = members(path)
    files[PT2] = buf.getvalue()
    write_zip(path, files)
    return path


def test_graph_that_writes_a_file_is_refused(tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep")

    def add(graph, out):
        mapped = graph.call_function(torch.ops.aten.from_file.default, (str(victim), True, 4), {"dtype": torch.uint8})
        mapped.meta["val"] = torch.empty(4, dtype=torch.uint8)
        filled = graph.call_function(torch.ops.aten.fill_.Scalar, (mapped, 65))
        filled.meta["val"] = torch.empty(4, dtype=torch.uint8)

    path = graph_with(tmp_path, add)
    with pytest.raises(adaptc.SaveLoadError, match="aten::from_file"):
        adaptc.load(path)(torch.randn(2, 3))
    assert victim.read_bytes() == b"keep"


def test_graph_that_calls_an_op_outside_aten_and_adaptc_is_refused(tmp_path):
    def add(graph, out):
        node = graph.call_function(torch.ops.profiler._record_function_enter.default, ("x",))
        node.meta["val"] = torch.empty(0)

    with pytest.raises(adaptc.SaveLoadError, match="profiler::_record_function_enter"):
        adaptc.load(graph_with(tmp_path, add))


def test_export_refuses_a_hostile_file_with_exit_code_2(tmp_path):
    from click.testing import CliRunner

    from adaptc.cli import main

    path = saved_program(tmp_path)
    marker = tmp_path / "ran"
    rewrite_program(path, lambda files: pickled_weight(files, marker))
    result = CliRunner().invoke(main, ["export", str(path), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "pickle" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "x.onnx").exists()


def test_own_dynamic_program_and_size_guards_still_load(tmp_path):
    path = saved_program(tmp_path)
    rewrite_program(path, lambda files: edit_json(files, "models/model.json", lambda p: p.update(
        guards_code=["L['input'].size()[1] == 3", "L['input'].size()[0] <= 64"])))  # as torch.export writes them
    loaded = adaptc.load(path)
    assert loaded(torch.randn(7, 3)).shape == (7, 3)
    with pytest.raises(AssertionError, match="Guard failed"):
        loaded.graph(torch.randn(65, 3))


# --- hf_blocks files: a Hugging Face config rebuilds the model ---------------------------------------

def saved_hf(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = tf.LlamaForCausalLM(config).eval()
    path = tmp_path / "evil.adaptc"
    adaptc.save(attach(model, CompiledState(report={"capture": {"granularity": "block"}})), path)
    return path


def rewrite_manifest(path, change) -> None:
    files = members(path)
    manifest = json.loads(files["manifest.json"])
    change(manifest)
    files["manifest.json"] = json.dumps(manifest).encode()
    write_zip(path, files)


def test_own_hf_file_still_loads(tmp_path):
    loaded = adaptc.load(saved_hf(tmp_path))
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


@pytest.mark.parametrize("change,words", [
    (lambda m: m["hf_config"].update(attn_implementation="org/kernel"), "attn_implementation"),
    (lambda m: m["hf_config"].update(_attn_implementation="kernels-community/flash-attn"), "attn_implementation"),
    (lambda m: m["hf_config"].update(experts_implementation="org/kernel"), "experts_implementation"),
    (lambda m: m["hf_config"].update(auto_map={"AutoModel": "org/repo--modeling.Model"}), "auto_map"),
    (lambda m: m["hf_config"].update(quantization_config={"quant_method": "eetq"}), "quantization_config"),
    (lambda m: m.update(model_class="BertModel"), "BertModel"),
    (lambda m: m.update(model_class="AutoModel"), "AutoModel"),
    (lambda m: m.update(plan=["attention_fusion"]), "plan"),
    (lambda m: m.update(plan={"attention_fusion": 3}), "plan"),
    (lambda m: m.update(plan={"no_such_pass": {}}), "no_such_pass"),
    (lambda m: m.update(report="x"), "report"),
    (lambda m: m["hf_config"].update(hidden_size="16"), "hidden_size"),
    (lambda m: m["hf_config"].update(num_hidden_layers=-1), "num_hidden_layers"),
    (lambda m: m["hf_config"].update(model_type="no_such_model"), "model_type"),
    (lambda m: m["hf_config"].update(model_type=["llama"]), "model_type"),
    (lambda m: m["hf_config"].update(intermediate_size=48), "size mismatch"),  # torch's message spans lines
    (lambda m: m.update(hf_config=[1]), "hf_config"),
    # allocatable or not, a model far larger than the weights in the file is refused before it is built
    (lambda m: m["hf_config"].update(vocab_size=2 ** 24, hidden_size=2 ** 14), "weights"),
    (lambda m: m["hf_config"].update(intermediate_size=2 ** 20), "weights"),
])
def test_damaged_or_hostile_hf_manifest_is_one_line(tmp_path, change, words):
    path = saved_hf(tmp_path)
    rewrite_manifest(path, change)
    with pytest.raises(adaptc.SaveLoadError) as info:
        adaptc.load(path)
    message = str(info.value)
    assert "\n" not in message and "evil.adaptc" in message and words in message, message


def test_manifest_that_inflates_is_refused_before_reading(tmp_path):
    path = tmp_path / "bomb.adaptc"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open("manifest.json", "w") as fh:
        fh.write(b'{"format": "adaptc", "pad": "')
        for _ in range(200):
            fh.write(b" " * (1 << 20))
        fh.write(b'"}')
    assert path.stat().st_size < 1 << 20
    with pytest.raises(adaptc.SaveLoadError, match="manifest.json.* too large"):
        adaptc.load(path)


def test_weight_sizes_that_ask_for_a_huge_allocation_are_refused(tmp_path):
    path = saved_program(tmp_path)

    def huge_empty_weight(files):  # an empty record with sizes: torch.export.load allocates zeros of that size
        edit_json(files, "data/weights/model_weights_config.json", lambda c: c["config"]["0.weight"]["tensor_meta"]
                  .update(sizes=[{"as_int": 1 << 24}, {"as_int": 1 << 24}]))
        files["data/weights/weight_0"] = b""

    rewrite_program(path, huge_empty_weight)
    with pytest.raises(adaptc.SaveLoadError, match="0.weight"):
        adaptc.load(path)


def test_save_into_a_missing_folder_names_the_path(tmp_path):
    fast = adaptc.compile(nn.Linear(3, 3).eval(), example_inputs=(torch.randn(2, 3),))
    target = tmp_path / "missing" / "m.adaptc"
    with pytest.raises(adaptc.SaveLoadError) as info:
        adaptc.save(fast, target)
    assert str(target) in str(info.value) and ".tmp" not in str(info.value)


def test_weights_that_are_not_a_dict_of_tensors_are_one_line(tmp_path):
    path = saved_hf(tmp_path)
    files = members(path)
    files["weights.pt"] = torch_bytes([torch.zeros(2)])
    write_zip(path, files)
    with pytest.raises(adaptc.SaveLoadError, match="evil.adaptc: weights.pt inside it is not a dict of tensors"):
        adaptc.load(path)
