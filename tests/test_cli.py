"""The `adaptc` command line: help that explains, JSON where a machine reads it."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from adaptc.cli import main


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "info" in result.output and "cache" in result.output


def test_info_json_names_device_and_kernels():
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["device"]["kind"] in ("cpu", "cuda")
    assert doc["kernels"]["fused_moe"]["implementations"] == ["reference", "cpu", "triton"]


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "adaptc.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "adaptc" in out.stdout


def test_tune_any_kernel_over_a_sweep_then_hits_the_cache():
    args = ["tune", "attention", "--problem", "B=1,Hq=4,Hkv=2,D=16,causal=true,window=0,padded=false,masked=false",
            "--sweep", "Lq=1,64", "--sweep", "Lk=64", "--trials", "2", "--seconds", "10", "--json"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    rows = json.loads(first.output)["results"]
    assert [r["problem"]["Lq"] for r in rows] == [1, 64] and all(r["measured"] >= 1 for r in rows)
    again = json.loads(CliRunner().invoke(main, args).output)["results"]
    assert [r["source"] for r in again] == ["cache", "cache"] and [r["config"] for r in again] == [r["config"] for r in rows]


def test_tune_says_what_a_problem_lacks():
    result = CliRunner().invoke(main, ["tune", "attention", "--problem", "B=1", "--trials", "1"])
    assert result.exit_code == 2 and "lacks 'Hq'" in result.output


def test_tune_the_kernels_of_a_hugging_face_model(tmp_path):
    from transformers import MixtralConfig

    MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2).save_pretrained(tmp_path)
    storage = f"sqlite:///{tmp_path / 'studies.db'}"  # shared by workers like PostgreSQL (tests/tuner/test_fleet.py)
    result = CliRunner().invoke(main, ["tune", "--hf-config", str(tmp_path), "--seq", "8", "--trials", "2",
                                       "--strategy", "tpe", "--storage", storage, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert {k["kernel"] for k in doc["kernels"]} >= {"fused_moe", "attention"} and doc["measured"] >= 2
    import optuna

    studies = optuna.get_all_study_summaries(storage)  # one per problem, through the shared storage
    sources = [k["source"] for k in doc["kernels"]]
    assert len(studies) == sources.count("measured") >= 2, doc["kernels"]


def test_tune_a_hugging_face_model_at_its_maximum_length_and_no_longer(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
               max_position_embeddings=16).save_pretrained(tmp_path)
    args = ["tune", "--hf-config", str(tmp_path), "--trials", "1", "--seconds", "5", "--json"]
    result = CliRunner().invoke(main, [*args, "--seq", "1", "--seq", "16"])  # the README's --seq 1 --seq 512
    assert result.exit_code == 0, result.output
    assert {k["seq"] for k in json.loads(result.output)["kernels"]} == {1, 16}
    result = CliRunner().invoke(main, [*args, "--seq", "8", "--seq", "17"])
    assert result.exit_code == 2 and "--seq 17" in result.output and "max_position_embeddings = 16" in result.output


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "postgresql://adaptc:hunter2@127.0.0.1:1/db"])
def test_tune_with_a_study_storage_it_cannot_open_says_so(url):
    result = CliRunner().invoke(main, ["tune", "fused_moe", "--problem", "H=64,I=32,E=8,K=2", "--tokens", "8",
                                       "--storage", url])
    assert result.exit_code == 1 and "cannot open the study storage" in result.output
    assert "Traceback" not in result.output and "hunter2" not in result.output


MOE = ["tune", "fused_moe", "--tokens", "8", "--trials", "1", "--problem"]


@pytest.mark.parametrize("args, says", [
    (MOE + ["H=-1,I=32,E=8,K=2"], "H must be a whole number >= 1, got -1"),
    (MOE + ["H=abc,I=32,E=8,K=2"], "H must be a whole number >= 1, got 'abc'"),
    (MOE + ["H=64,I=32,E=8,K=9"], "K (experts per token) must be at most E"),
    (MOE + ["H=64,I=32,E=8,K=2,gated=maybe"], "gated must be true or false"),
    (MOE + ["H=64,I=32,E=8,K=2,Z=3"], "unknown name(s) Z"),
    (MOE + ["H=64,H=64,I=32,E=8,K=2"], "H is given twice"),
    (MOE + ["=3"], "'=3' is not NAME=VALUE"),
    (MOE + ["H=64,I=32,E=8,K=2,T=8"], "T is in --problem"),
    (["tune", "attention", "--problem", "B=1,Hq=3,Hkv=2,Lq=8,Lk=8,D=8,window=0"], "multiple of Hkv"),
    (["tune", "fused_moe", "--problem", "H=64,I=32,E=8,K=2", "--sweep", "T=8,,16"], "is not NAME=V1,V2"),
    (["tune", "fused_moe", "--problem", "H=64,I=32,E=8,K=2", "--tokens", "0"], "0 is not in the range x>=1"),
    (MOE + ["H=64,I=32,E=8,K=2", "--trials", "0"], "0 is not in the range x>=1"),
    (MOE + ["H=64,I=32,E=8,K=2", "--seconds", "0"], "x>0"),
    (MOE + ["H=64,I=32,E=8,K=2", "--dtype", "int8"], "'int8' is not one of"),
    (MOE + ["H=64,I=32,E=8,K=2", "--device", "tpu"], "'tpu' is not cpu, cuda or cuda:N"),
    (["tune"], "give a KERNEL"),
    (["tune", "fused_moe", "--hf-config", "."], "--hf-config tunes the kernels a model calls"),
    (MOE + ["H=64,I=32,E=8,K=2", "--storage", "foo://x"], "unknown study storage URL 'foo://x'"),
])
def test_tune_refuses_bad_input_before_any_work(args, says, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTC_CACHE_DIR", str(tmp_path))
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (1, 2) and says in result.output, result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())  # nothing tuned, nothing written


def test_the_attention_example_in_tune_help_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTC_CACHE_DIR", str(tmp_path))
    usage = CliRunner().invoke(main, ["tune", "--help"]).output
    example = next(line.split()[2:] for line in usage.splitlines() if "adaptc tune attention" in line)
    result = CliRunner().invoke(main, ["tune", *example, "--trials", "1", "--seconds", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["results"]) == 2
