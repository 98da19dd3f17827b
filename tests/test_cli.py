"""The `adaptc` command line: help that explains, JSON where a machine reads it."""
import json
import subprocess
import sys

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
