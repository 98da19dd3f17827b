"""Without LightGBM (an optional dependency: adaptc[costmodel]) tuning searches without the cost
model and says so in one line, from `adaptc tune` as from compile."""
import json
import shlex
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adaptc.cli import main
from adaptc.kernels.moe import space
from adaptc.tuner.session import tune_calls
from adaptc.tuner.tune import Budget

NOTE = "lightgbm is not installed (pip install 'adaptc[costmodel]'); searching without the cost model"
README = Path(__file__).parents[2] / "README.md"


@pytest.fixture
def no_lightgbm(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightgbm", None)  # `import lightgbm` raises ImportError


def readme_command(start: str) -> list[str]:
    """The README's `adaptc tune ...` line starting with `start`, its continuation lines joined."""
    lines = README.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(start))
    text = lines[i]
    while text.split("#")[0].rstrip().endswith("\\"):
        i += 1
        text = text.split("#")[0].rstrip()[:-1] + " " + lines[i]
    return shlex.split(text.split("#")[0])[1:]  # without "adaptc"


@pytest.mark.parametrize("start", ["adaptc tune fused_moe", "adaptc tune attention"])
def test_the_readmes_tune_lines_run_without_lightgbm(start, no_lightgbm, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTC_CACHE_DIR", str(tmp_path))
    args = readme_command(start)
    assert args[:2] == ["tune", start.split()[-1]] and "--problem" in args
    result = CliRunner().invoke(main, [*args, "--trials", "1", "--seconds", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [f"note: {NOTE}"]
    rows = json.loads(result.stdout)["results"]
    assert len(rows) == 2 and all(r["source"] == "measured" and r["measured"] == 1 for r in rows)


def test_compile_tuning_says_it_once_and_measures(no_lightgbm, tmp_path, monkeypatch):
    args = space.make_inputs(10, 32, 32, 4, 2, seed=7)
    other = space.make_inputs(40, 32, 32, 4, 2, seed=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tune_calls(lambda: (torch.ops.adaptc.fused_moe(*args), torch.ops.adaptc.fused_moe(*other)),
                            Budget(trials=2, seconds=5, seconds_per_trial=0.005))
    assert [str(w.message) for w in caught if "lightgbm" in str(w.message)] == [f"adaptc: {NOTE}"]
    assert [k["source"] for k in result["kernels"]] == ["measured", "measured"]
    with warnings.catch_warnings(record=True) as caught:  # all from the cache: no search, nothing to say
        warnings.simplefilter("always")
        again = tune_calls(lambda: torch.ops.adaptc.fused_moe(*args), Budget(trials=2))
    assert again["cache_hits"] == 1 and not [w for w in caught if "lightgbm" in str(w.message)]
