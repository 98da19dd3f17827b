"""`adaptc convert IN.onnx -o OUT.onnx`: ONNX in, faster ONNX out, verified in onnxruntime.

Exit codes: 0 converted and verified; 1 the result did not match the original (nothing written);
2 bad input or arguments. Either failure ends with one `Error: ...` line on stderr naming the problem.
"""
from __future__ import annotations

import json
from typing import Any

import click

from .errors import AdaptcError, VerificationError

EXIT_MISMATCH, EXIT_BAD_INPUT = 1, 2


class BadInput(click.ClickException):
    """Printed by click as `Error: ...`, with exit code 2 like click's own usage errors."""

    exit_code = EXIT_BAD_INPUT


@click.command("convert")
@click.argument("input_path", metavar="IN.onnx", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the converted model (never the input, its external data or the calibration file); "
                   "a model over 2 GB keeps its weights beside it in OUT.onnx.data.")
@click.option("--force", is_flag=True, help="Replace OUT.onnx if it exists.")
@click.option("--passes", default="attention,moe,reroll", show_default=True,
              help="Comma-separated rewrites: attention (MatMul/Softmax/MatMul → one attention op), "
                   "moe (router TopK → gathered expert MatMuls → one MoE op, or per-expert MatMuls), "
                   "reroll (n copies of one weight-shared block, e.g. ALBERT's layers → one ONNX Loop), "
                   "early_exit (approximate: calibrated exits between layers as ONNX If; needs --calibration).")
@click.option("--target", type=click.Choice(["standard", "onnxruntime"]), default="standard", show_default=True,
              help="standard: ONNX ops only (Attention, opset 23). onnxruntime: may use com.microsoft "
                   "contrib ops that onnxruntime's CPU provider has kernels for (MultiHeadAttention, MoE).")
@click.option("--calibration", type=click.Path(exists=False, dir_okay=False), default=None,
              help="An .npz of input rows (arrays named after the model's inputs, one row per sample; a scalar "
                   "input takes one value): verified on besides random inputs (instead of them where the model "
                   "rejects those); early_exit fits and certifies its exits on it.")
@click.option("--quality", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=None,
              help="early_exit: agreement with the original to keep (same class; cosine for embeddings)  [default: 0.99]")
@click.option("--delta", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.1, show_default=True,
              help="early_exit: the guarantee holds with probability >= 1 - delta over the calibration draw.")
@click.option("--no-verify", is_flag=True, help="Skip the comparison with the original (not recommended).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document instead of a table.")
def convert_command(input_path: str, output_path: str, force: bool, passes: str, target: str, calibration: str | None,
                    quality: float | None, delta: float, no_verify: bool, as_json: bool) -> None:
    """Convert IN.onnx into a faster, equivalent ONNX model.

    Loads the model (external data and >2 GB models included), cleans it up (constant folding, dead
    nodes, shape inference), fuses the attention subgraphs that the torch exporters write into one
    attention op, then runs the original (onnxruntime, graph optimizations off) and the result
    (onnxruntime defaults) on the same random inputs and compares every output. The result is written
    only if every output matches within tolerance.

    early_exit (opt-in) adds exits after layers as ONNX If nodes, with thresholds certified on the
    calibration rows (Learn-then-Test) to keep agreement >= --quality; it declines, saying why, when no
    exit can, and is rolled back if onnxruntime's own run of the result falls short.

    \b
    Examples:
      adaptc convert bert.onnx -o bert.fast.onnx
      adaptc convert gpt2.onnx -o gpt2.ort.onnx --target onnxruntime --json
      adaptc convert classifier.onnx -o classifier.exits.onnx --passes attention,early_exit \\
          --calibration rows.npz --quality 0.99
    """
    from .convert import ConvertFailed, convert

    names = [p.strip() for p in passes.split(",") if p.strip()]
    try:
        report = convert(input_path, output_path, passes=names, target=target, calibration=calibration,
                         verify=not no_verify, quality=quality, delta=delta, overwrite=force)
    except ConvertFailed as e:
        _emit({**e.report, "error": str(e)}, as_json)
        raise click.ClickException(str(e)) from None
    except VerificationError as e:
        raise click.ClickException(str(e)) from None
    except AdaptcError as e:
        raise BadInput(str(e)) from None
    _emit(report, as_json)


def _emit(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        from rich.console import Console

        Console().print(render(report))


def render(report: dict[str, Any]):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    nodes, opset = report.get("nodes", {}), report.get("opset", {})
    head = Text.assemble((f"{report['input']} → {report['output']}", "bold"),
                         f"  target {report['target']}; opset {opset.get('before')} → {opset.get('after')}; "
                         f"nodes {nodes.get('before')} → {nodes.get('after_cleanup')} (cleanup) → {nodes.get('after')}")
    fusions = Table("rewrite", "fired", "declined (why)", header_style="bold")
    for f in report.get("fusions", []):
        why = "; ".join(f"{d['site']}: {d['reason']}" for d in f["declined"][:2]) or "-"
        fusions.add_row(f["rule"], Text(str(f["fired"]), style="green" if f["fired"] else "yellow"), why)
    parts = [head, fusions]
    verification = report.get("verification", {})
    if verification.get("outputs"):
        checks = Table("output", "max abs err", "max rel err", "tolerance", header_style="bold",
                       title=f"verified on {verification['batches']} batch(es) {verification['inputs']}")
        for name, row in verification["outputs"].items():
            ok = row["max_rel"] <= row["tolerance"]
            checks.add_row(name, f"{row['max_abs']:.2e}", Text(f"{row['max_rel']:.2e}", style="green" if ok else "red"),
                           f"{row['tolerance']:.0e}")
        parts.append(checks)
    elif verification.get("skipped"):
        parts.append(Text(f"verification skipped ({verification['skipped']})", style="yellow"))
    exits = report.get("early_exit")
    if exits:
        parts.append(_render_exits(exits))
    latency = report.get("latency_ms")
    if latency:
        parts.append(Text(f"latency (onnxruntime defaults, inputs {latency['inputs']}): {latency['before']:.2f} ms → "
                          f"{latency['after']:.2f} ms ({latency['speedup']:.2f}x)", style="dim"))
    if "error" in report:
        parts.append(Text(report["error"], style="bold red"))
    return Group(*parts)


def _render_exits(ee: dict[str, Any]):
    from rich.text import Text

    status = ee["status"]
    if status != "applied":
        return Text(f"early_exit {status}: {ee['reason']}", style="yellow")
    runtime, latency = ee.get("runtime_agreement", {}), ee.get("latency_ms")
    line = (f"early_exit applied: {ee['kind']}, exits after layers {[e + 1 for e in ee['exit_layers']]} of {ee['num_layers']} "
            f"({ee['measure']}); agreement {ee['measured_agreement']:.4f} on {ee['calibration_rows']} calibration rows, "
            f"onnxruntime batch 1 {runtime.get('batch1', float('nan')):.4f} / batch 16 {runtime.get('batch16', float('nan')):.4f}; "
            f"exits taken {ee['exit_histogram']}; expected speedup {ee['expected_speedup']:.2f}x")
    if latency:
        line += f"; measured {latency['speedup']:.2f}x over {latency['runs_of']} rows at batch 1"
    return Text(line + f"\n  guarantee: {ee['guarantee']}", style="green")


@click.command("export")
@click.argument("module_path", metavar="MODULE.adaptc", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the ONNX model (never the input).")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def export_command(module_path: str, output_path: str, force: bool, as_json: bool) -> None:
    """Write a module saved by adaptc.save to ONNX (opset 23), verified in onnxruntime.

    Whole-graph captures only (encoders, pure functions); adaptc::attention becomes ONNX Attention and
    adaptc::fused_moe standard ops. The inputs the module was captured with are the example inputs.

    \b
    Example:
      adaptc export bert.adaptc -o bert.onnx
    """
    from pathlib import Path

    from . import load
    from .convert import check_output
    from .export import export_onnx

    try:
        check_output(Path(output_path), force, {Path(module_path): "the input file"})  # before the slow load
        report = export_onnx(load(module_path), None, output_path, overwrite=force)
    except VerificationError as e:
        raise click.ClickException(str(e)) from None
    except AdaptcError as e:
        raise BadInput(str(e)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        worst = report.get("verification", {}).get("worst", {})
        ops = ", ".join(f"{k} x{v}" for k, v in report["adaptc_ops"].items()) or "no adaptc ops"
        click.echo(f"{module_path} → {output_path}: opset {report['opset']}, {ops}; "
                   f"verified in onnxruntime (max rel err {worst.get('max_rel', float('nan')):.2e})")
