"""A model that cannot be captured: one line naming the construct and where it is, pointing at the caller."""
import os
import subprocess
import sys
import warnings

import torch

import adaptc
from tests.test_api import DataDependent

SCRIPT = """
import torch, adaptc
from torch import nn
class TwoLines(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x + 1
        return -x
adaptc.compile(TwoLines(), example_inputs=(torch.randn(2, 4),), tune=False)
"""


def _compile_in_a_process(tmp_path, **env):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(adaptc.__file__)), **env}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True, cwd=tmp_path)


def test_an_unexportable_model_prints_one_warning_naming_the_construct(tmp_path):
    out = _compile_in_a_process(tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    # the warning, then the user's line Python shows under it
    assert len(lines) == 2, out.stderr
    assert lines[0].startswith(f"{tmp_path / 'user_script.py'}:9: UserWarning: adaptc: cannot capture TwoLines")
    assert "user_script.py:6 in forward: if x.sum() > 0:" in lines[0]
    assert "def forward(" not in out.stderr


def test_adaptc_debug_keeps_torchs_traced_graph(tmp_path):
    out = _compile_in_a_process(tmp_path, ADAPTC_DEBUG="1")
    assert "def forward(" in out.stderr and "keeping block granularity" in out.stderr


def test_compile_warnings_point_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adaptc.compile(DataDependent(), example_inputs=(torch.randn(2, 4),), tune=False)
    (w,) = [w for w in caught if "keeping block granularity" in str(w.message)]
    assert w.filename == __file__
