"""A readable summary of a compile report, for people (the report itself is for machines)."""
from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {"applied": "green", "skipped": "yellow", "rolled_back": "red"}


def render(report: dict[str, Any], title: str | None = None) -> Group:
    cap = report.get("capture", {})
    head = Text.assemble(
        (title or report.get("model", "model"), "bold"),
        f"  compiled in {report.get('compile_seconds', 0):.2f}s on {report.get('device', '?')}; ",
        f"capture: {cap.get('granularity', '?')} ({cap.get('method', '?')})",
    )
    table = Table(show_header=True, header_style="bold", expand=False)
    for col in ("pass", "status", "sites", "max rel err", "why / declined"):
        table.add_column(col)
    verification = report.get("verification", {})
    for p in report.get("passes", []):
        v = verification.get(p["name"])
        why = p["reason"] or "; ".join(f"{d['site']}: {d['reason']}" for d in p.get("declined", [])[:2])
        table.add_row(
            p["name"], Text(p["status"], style=STATUS_STYLE.get(p["status"], "")), str(len(p["sites"])),
            f"{v['max_rel']:.1e} over {v['inputs_checked']} inputs" if v else "-", why or "-",
        )
    tuning = report.get("tuning", {})
    foot = Text(f"tuning: {tuning.get('measured', 0)} measured, {tuning.get('cache_hits', 0)} from cache", style="dim")
    return Group(head, table, foot)
