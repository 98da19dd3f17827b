"""The contract around compile(): errors, capture, rollback, report, lean import."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import adaptc
from adaptc.capture.inputs import Inputs
from adaptc.config import CompileConfig
from adaptc.passes._base import CompileContext, ModuleEdit, Pass, PassManager, Site


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: neither export nor fx can capture it
            return self.lin(x)
        return -x


def test_uncapturable_model_names_construct_and_fallback():
    with pytest.raises(adaptc.CaptureError) as err:
        adaptc.compile(DataDependent(), example_inputs=(torch.randn(2, 4),), capture="graph")
    msg = str(err.value)
    assert "torch.export" in msg and "fx.symbolic_trace (fallback)" in msg
    assert "x.sum() > 0" in msg


def test_uncapturable_model_in_auto_mode_keeps_blocks_and_says_why():
    model = DataDependent()
    with pytest.warns(UserWarning, match="keeping block granularity"):
        fast = adaptc.compile(model, example_inputs=(torch.randn(2, 4),))
    cap = adaptc.report(fast)["capture"]
    assert cap["granularity"] == "blocks" and "x.sum() > 0" in cap["reason"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(fast(x), model(x))


def test_pure_model_is_exported_with_dynamic_batch():
    model = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 2)).eval()
    fast = adaptc.compile(model, example_inputs=(torch.randn(4, 6),))
    report = adaptc.report(fast)
    assert report["capture"]["method"] == "export" and report["verification"]["capture"]["ok"]
    for batch in (1, 9):
        x = torch.randn(batch, 6)
        torch.testing.assert_close(fast(x), model(x))


def test_batch_one_example_still_gives_a_dynamic_graph():
    model = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 2)).eval()
    fast = adaptc.compile(model, example_inputs=(torch.randn(1, 5, 6),))
    assert adaptc.report(fast)["capture"]["method"] == "export"
    for shape in [(1, 5, 6), (4, 1, 6), (3, 9, 6)]:
        x = torch.randn(shape)
        assert fast.accepts((x,), {}), shape  # runs the graph, not the eager fallback
        torch.testing.assert_close(fast(x), model(x))
    assert not fast.accepts((torch.randn(2, 5, 6).double(),), {})


def test_report_is_json_and_has_the_contract_fields():
    fast = adaptc.compile(nn.Linear(3, 3), example_inputs=(torch.randn(2, 3),))
    report = json.loads(json.dumps(adaptc.report(fast)))
    assert set(report) >= {"passes", "verification", "tuning"}
    assert [k["kernel"] for k in report["tuning"]["kernels"]] == ["linear"]  # tuned_linear's GEMM choice
    assert {"name", "status", "sites", "reason"} <= set(report["passes"][0])


def test_bad_arguments_are_clear():
    with pytest.raises(adaptc.AdaptcError, match="example_inputs"):
        adaptc.compile(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown pass"):
        adaptc.compile(nn.Linear(2, 2), example_inputs=(torch.randn(1, 2),), passes=["warp_drive"])
    with pytest.raises(ValueError, match="capture"):
        adaptc.compile(nn.Linear(2, 2), example_inputs=(torch.randn(1, 2),), capture="magic")
    with pytest.raises(TypeError, match="not made by adaptc"):
        adaptc.report(nn.Linear(2, 2))


def readers(option: str) -> str:
    """The passes whose config has this field, as compile's errors name them."""
    from adaptc.passes import option_readers

    return ", ".join(option_readers(option))


def test_a_misspelled_option_is_an_error_naming_the_nearest_valid_name():
    x = (torch.randn(1, 2),)
    assert {"early_exit", "token_router"} <= set(readers("max_length").split(", "))
    for typo, meant in (("tnue", "'tune'"), ("tune_trails", "'tune_trials'"), ("calibraton", "'calibration'"),
                        ("max_lenght", f"'max_length' ({readers('max_length')} option)"),
                        ("distil_steps", f"'distill_steps' ({readers('distill_steps')} option)"),
                        ("progres", "'progress'")):
        with pytest.raises(adaptc.AdaptcError) as err:
            adaptc.compile(nn.Linear(2, 2), example_inputs=x, **{typo: False})
        assert str(err.value) == f"unknown compile option {typo!r}: did you mean {meant}?"
    with pytest.raises(adaptc.AdaptcError, match="unknown compile option 'zzzz'; the options are: .*tune_trials"):
        adaptc.compile(nn.Linear(2, 2), example_inputs=x, zzzz=1)
    fast = adaptc.compile(nn.Linear(2, 2), example_inputs=x, tune=False, progress=False)
    assert adaptc.report(fast)["config"]["progress"] is False


def test_an_option_only_an_unselected_pass_reads_is_an_error_naming_that_pass():
    x = (torch.randn(1, 2),)
    with pytest.raises(adaptc.AdaptcError) as err:
        adaptc.compile(nn.Linear(2, 2), example_inputs=x, tune=False, delta=0.05)  # the exact passes
    assert str(err.value).startswith(f"option 'delta' is read by {readers('delta')}, which are not among "
                                     "passes=['moe_fusion'")
    with pytest.raises(adaptc.AdaptcError, match=f"option 'tokenizer' is read by {readers('tokenizer')}, which are not "
                                                 r"among passes=\['sdpa_fusion'\]"):
        adaptc.compile(nn.Linear(2, 2), example_inputs=x, passes=["sdpa_fusion"], tokenizer=None)


def test_a_misspelled_pass_option_names_the_pass_and_the_nearest_field():
    from adaptc.passes import EarlyExit, EarlyExitConfig

    with pytest.raises(adaptc.AdaptcError) as err:
        EarlyExit(dleta=0.05)
    assert str(err.value) == "early_exit has no option 'dleta': did you mean 'delta'?"
    with pytest.raises(adaptc.AdaptcError, match="early_exit has no option 'zzz'; its options are: tokenizer, "):
        EarlyExitConfig.of(zzz=1)
    with pytest.raises(adaptc.AdaptcError) as err:
        adaptc.compile(nn.Linear(2, 2), example_inputs=(torch.randn(1, 2),), passes=["early_exit"], dleta=0.05)
    assert str(err.value) == f"unknown compile option 'dleta': did you mean 'delta' ({readers('delta')} option)?"
    with pytest.raises(adaptc.AdaptcError, match="set twice"):
        adaptc.compile(nn.Linear(2, 2), example_inputs=(torch.randn(1, 2),), passes=[EarlyExit(delta=0.05)],
                       delta=0.2, calibration=[torch.ones(1, 2, dtype=torch.long)])


def test_every_pass_has_a_typed_config_that_validates_and_round_trips():
    from adaptc import passes
    from adaptc.passes import EarlyExitConfig, PassConfig

    for name, cls in passes.registry().items():
        cfg_cls = cls.config_class
        assert cfg_cls is not PassConfig and cfg_cls.__name__ == type(cls()).__name__ + "Config", name
        assert cfg_cls.pass_name == name
        cfg = cfg_cls()
        assert passes.load_config(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in ({"delta": 0.0}, {"delta": 1.0}, {"delta": "0.1"}, {"calibration_batch": 0}, {"max_length": -5},
                {"distill_steps": -1}, {"distill_lr": 0}, {"adapter_ridge": -1e-3}, {"first_exit": -1},
                {"distill_fraction": 1.5}, {"calibration_batch": True}):
        with pytest.raises(adaptc.AdaptcError, match=f"early_exit option {next(iter(bad))}="):
            EarlyExitConfig(**bad)
    cfg = EarlyExitConfig(delta=0.05, first_exit=3, tokenizer=object())
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["type"] == "EarlyExitConfig" and data["version"] == 1 and data["tokenizer"] == "<object>"
    back = passes.load_config(data)
    assert back.delta == 0.05 and back.first_exit == 3 and back.tokenizer is None  # a live object is not data
    for data, why in (({**data, "type": "os.system"}, "unknown pass config type 'os.system'"),
                      ({**data, "version": 99}, "version 99"), ({**data, "dleta": 1}, "no field"),
                      ({**data, "delta": 7}, "delta=7")):
        with pytest.raises(ValueError, match=why):
            passes.load_config(data)


def test_every_config_field_a_pass_reads_exists():
    import inspect
    import re

    from adaptc import passes

    for cls in passes.registry().values():
        source = inspect.getsource(inspect.getmodule(cls))
        read = {n for n in re.findall(r"self\.config\.(\w+)", source) if not callable(getattr(cls.config_class, n, None))}
        assert read <= set(cls.config_class.field_names()), (cls.name, read - set(cls.config_class.field_names()))


def test_passes_carry_no_state_between_phases():
    from adaptc.passes import EarlyExit

    p = EarlyExit(delta=0.05)
    with pytest.raises(AttributeError, match="no state between phases"):
        p.details = {}
    assert vars(p) == {"config": p.config} and repr(p) == "EarlyExit(delta=0.05)"

    with pytest.raises(TypeError, match="defines no rebuild"):
        class Unsaveable(Pass):  # noqa: F841  (a saveable pass must say how load re-applies it)
            name = "unsaveable"


def test_importing_the_tuner_session_installs_no_config_source_and_compile_does():
    code = ("import torch, adaptc, adaptc.tuner.session as s; from adaptc.kernels import _registry as r; "
            "before = r.config_source(); "
            "adaptc.compile(torch.nn.Linear(2, 2), example_inputs=(torch.randn(1, 2),), speed_check=False); "
            "print(before is None, r.config_source() is s._from_cache)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.split() == ["True", "True"]


class BreakLinear(Pass):
    """A wrong rewrite: the manager must catch it and roll it back."""

    name = "break_linear"
    saveable = False

    def match(self, ctx):
        return [Site(n, m) for n, m in ctx.working.named_modules() if isinstance(m, nn.Linear)]

    def apply(self, ctx, site, plan, edit):
        wrong = nn.Linear(site.module.in_features, site.module.out_features)
        edit.replace(site.path, wrong)


def test_failed_verification_rolls_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    working = nn.Sequential(*model)  # shares the layers
    x = Inputs.of((torch.randn(2, 4),))
    ctx = CompileContext(model, working, x, [x], CompileConfig())
    (result,), verification = PassManager([BreakLinear()]).run(ctx)
    assert result.status == "rolled_back" and "verification failed" in result.reason
    assert not verification["break_linear"]["ok"]
    assert working[0] is model[0] and working[2] is model[2]


def test_module_edit_rolls_back_in_reverse():
    root = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    old = [root[0], root[1][0]]
    edit = ModuleEdit(root)
    edit.replace("0", nn.Identity())
    edit.replace("1.0", nn.Tanh())
    edit.rollback()
    assert [root[0], root[1][0]] == old


def test_compile_config_round_trips():
    from adaptc.passes import EarlyExitConfig

    cfg = CompileConfig(passes=["moe_fusion"], quality=0.99, capture="graph", progress=True)
    assert CompileConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg = CompileConfig(passes=["early_exit"], pass_configs={"early_exit": EarlyExitConfig(delta=0.05)})
    assert CompileConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown pass config type"):
        CompileConfig.from_dict({**cfg.to_dict(), "pass_configs": {"early_exit": {"type": "Evil", "version": 1}}})
    with pytest.raises(ValueError, match="not a pass config"):
        CompileConfig(pass_configs={"early_exit": {"delta": 0.05}})
    with pytest.raises(ValueError):
        CompileConfig(quality=1.5)
    with pytest.raises(ValueError, match="progress must be"):
        CompileConfig(progress="yes")


def test_import_touches_no_gpu():
    code = ("import torch, adaptc, adaptc.kernels, adaptc.passes.moe_fusion; "
            "print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_graph_calls_outside_its_shape_ranges_run_eager():
    from adaptc.runtime.module import CompiledModule

    model = nn.Sequential(nn.Linear(6, 6)).eval()
    fast = adaptc.compile(model, example_inputs=(torch.randn(2, 5, 6),), tune=False)
    assert isinstance(fast, CompiledModule)
    (dims,) = fast._signature[1]
    assert dims[1][2] == 6 and isinstance(dims[1][0], tuple)  # batch symbolic, features fixed
    assert not fast.accepts((torch.randn(2, 5, 7),), {})  # a fixed size differs: the eager model runs
    fast._signature = (fast._signature[0], [(torch.float32, (("s0", 3, 8), ("s0", 0, None), 6))])
    assert not fast.accepts((torch.randn(2, 2, 6),), {})  # below the symbol's minimum
    assert not fast.accepts((torch.randn(4, 5, 6),), {})  # one symbol, two sizes
    assert fast.accepts((torch.randn(4, 4, 6),), {})


def test_bert_with_token_type_ids_compiles_with_a_json_report():
    import json

    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96)
    model = tf.AutoModel.from_config(cfg).eval()
    ids = torch.randint(0, 128, (2, 10))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    fast = adaptc.compile(model, example_inputs=example, tune=False)
    report = json.loads(json.dumps(adaptc.report(fast)))  # random check inputs keep token types in range
    assert {p["name"]: p["status"] for p in report["passes"]}["attention_fusion"] == "applied"
    assert report["config"]["pass_configs"]["attention_fusion"] == {"type": "AttentionFusionConfig", "version": 1}


def test_compiling_a_compiled_module_or_a_function_says_so_up_front():
    model = nn.Linear(3, 3).eval()
    x = torch.randn(2, 3)
    fast = adaptc.compile(model, example_inputs=(x,), tune=False)
    with pytest.raises(adaptc.AdaptcError, match="already compiled"):
        adaptc.compile(fast, example_inputs=(x,))
    with pytest.raises(adaptc.AdaptcError, match="already compiled"):
        adaptc.compile(adaptc.compile(model, example_inputs=(x,), capture="blocks", tune=False), example_inputs=(x,))
    with pytest.raises(adaptc.AdaptcError, match="takes an nn.Module.*function"):
        adaptc.compile(lambda t: t * 2, example_inputs=(x,))
