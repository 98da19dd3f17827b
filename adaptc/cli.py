"""The `adaptc` command line. Subcommands live beside what they drive (`adaptc.cache.cli`, ...)."""
from __future__ import annotations

import json
import warnings

import click

from ._version import VERSION


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name="adaptc")
def main() -> None:
    """adaptc: compile PyTorch and ONNX models into faster, verified drop-ins.

    From Python, `adaptc.compile(model, example_inputs=...)`. From the shell, the commands below.
    """
    # On a terminal a warning is one line, not Python's "file:line: SomeWarning" with the source line.
    warnings.showwarning = lambda message, *_, **__: click.echo(f"warning: {message}", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def info(as_json: bool) -> None:
    """Show this machine's device fingerprint and the kernels adaptc can run here."""
    import torch

    from .kernels import KERNELS
    from .tuner.device import device_fingerprint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernels = {name: {"implementations": ["reference", *k.implementations]} for name, k in KERNELS.items()}
    doc = {"adaptc": VERSION, "torch": torch.__version__, "device": device_fingerprint(device).to_dict(), "kernels": kernels}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    device_table = Table("device", "", show_header=False, title=f"adaptc {VERSION} · torch {torch.__version__}")
    for key, value in doc["device"].items():
        device_table.add_row(key, ", ".join(value) if isinstance(value, (list, tuple)) else str(value))
    kernel_table = Table("kernel", "implementations")
    for name, k in kernels.items():
        kernel_table.add_row(name, ", ".join(k["implementations"]))
    Console().print(device_table, kernel_table)

@main.command("report")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw the speed-vs-quality frontier to this PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
def report_command(path: str, plot: str | None, as_json: bool) -> None:
    """Show what compile did to a saved module (PATH, a .adaptc file): passes and the quality frontier."""
    from .errors import AdaptcError
    from .runtime.serialize import read_report

    try:
        report = read_report(path)
        if plot:
            from .budget import plot_frontier

            plot_frontier(report, plot)
    except AdaptcError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report.get('model', '?')} · adaptc {report.get('adaptc_version', '?')} · "
               f"{report.get('capture', {}).get('granularity', '?')} granularity")
    for p in report.get("passes", []):
        click.echo(f"  {p['name']:<24} {p['status']:<12} {p.get('reason', '')}"[:160])
    budget, frontier = report.get("budget"), report.get("frontier") or []
    if budget:
        click.echo(f"quality budget {budget['quality']} (delta {budget['delta']}) over {', '.join(budget['passes'])}:")
        click.echo("  point  search  held-out  expected  measured  certified for")
        for f in frontier:
            if f["tested"] or f["chosen"]:
                mark = "  chosen" if f["chosen"] else ""
                click.echo(f"  {f['id']:>5}  {f['search_agreement']:.4f}  {f['agreement']:.4f}    "
                           f"{f['held_out_expected_speedup']:.3f}x   {f['measured_speedup'] or 0:.3f}x    "
                           f"{f['certified_for']}{mark}")
    if plot:
        click.echo(f"frontier drawn to {plot}")


from .cache.cli import cache  # noqa: E402  (subcommands are defined beside what they drive)
from .tuner.cli import tune_command  # noqa: E402
from .convert_cli import convert_command, export_command  # noqa: E402

main.add_command(cache)
main.add_command(tune_command)
main.add_command(convert_command)
main.add_command(export_command)


if __name__ == "__main__":
    main()
