"""What every benchmark script shares: the device's name and writing results named after it."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    from adaptc.tuner.device import device_fingerprint

    fp = device_fingerprint("cpu")
    return f"{fp.name} ({fp.cores} cores)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_results(out: Path, benchmark: str, device: str, doc: dict[str, Any], markdown: str) -> None:
    """`<benchmark>-<device>.json` (every number) and `.md` (the table people read) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{benchmark}-{slug(device)}.json").write_text(json.dumps(doc, indent=2))
    (out / f"{benchmark}-{slug(device)}.md").write_text(markdown)
    print(markdown)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (said once) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install 'adaptc[bench]'): no plot")
        return None
    return plt
