"""`adaptc tune`: tune kernels ahead of time, on this machine or as one of many workers."""
from __future__ import annotations

import json
import sys

import click


def _parse_problem(text: str) -> dict:
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if not value:
            raise click.BadParameter(f"{part!r} is not NAME=VALUE")
        out[name.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return out


@click.command("tune")
@click.argument("kernel")
@click.option("--problem", "problems", multiple=True, required=True, metavar="NAME=V,...",
              help="Problem sizes without the token count, e.g. H=1024,I=3584,E=8,K=2 (repeatable).")
@click.option("--tokens", multiple=True, type=int, default=(1, 16, 128, 512, 2048), show_default=True,
              help="Token counts to tune each problem at (repeatable).")
@click.option("--dtype", default=None, help="float32, float16 or bfloat16 (default: bfloat16 on GPU, float32 on CPU).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when there is one).")
@click.option("--trials", default=24, show_default=True, help="Measurements per problem, at most.")
@click.option("--seconds", default=60.0, show_default=True, help="Wall time per problem, at most.")
@click.option("--strategy", type=click.Choice(["model+tpe", "tpe", "random", "exhaustive"]), default="model+tpe",
              show_default=True)
@click.option("--storage", default=None, metavar="URL",
              help="Optuna storage shared by workers (postgresql://… or redis://…): run this same command on "
                   "several machines and they split the trials; no config is measured twice.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def tune_command(kernel, problems, tokens, dtype, device, trials, seconds, strategy, storage, as_json):
    """Tune KERNEL (e.g. fused_moe) for each --problem at each --tokens count; results go to the cache.

    \b
    adaptc tune fused_moe --problem H=1024,I=3584,E=8,K=2 --tokens 16 --tokens 128
    """
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from ..cache import default_cache
    from ..kernels import KERNELS
    from .tune import Budget, optuna_storage, tune
    from .cost_model import CostModel

    if kernel not in KERNELS or KERNELS[kernel].example is None:
        raise click.BadParameter(f"unknown kernel {kernel!r}; tunable: {', '.join(n for n, k in KERNELS.items() if k.example)}")
    k = KERNELS[kernel]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    impl = "triton" if device == "cuda" else "cpu"
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    cache, budget = default_cache(), Budget(trials=trials, seconds=seconds)
    model = CostModel.train(kernel, impl, cache.scan().records) if strategy == "model+tpe" else None
    store = optuna_storage(storage)
    jobs = [{**_parse_problem(p), "T": t, "dtype": dtype, "gated": True} for p in problems for t in tokens]
    rows = []
    with Progress(console=Console(stderr=True), disable=as_json or not sys.stderr.isatty()) as progress:
        task = progress.add_task(f"tuning {kernel}/{impl}", total=len(jobs) * trials)
        for job in jobs:
            try:
                args = k.example({**job}, device)
            except (KeyError, ValueError, TypeError) as e:
                raise click.BadParameter(f"problem {job}: {e}") from None
            out = tune(kernel, impl, args, cache=cache, budget=budget, strategy=strategy, cost_model=model,
                              storage=store, on_trial=lambda _: progress.advance(task))
            progress.advance(task, trials - out.measured)
            rows.append({"problem": out.problem, "source": out.source, "measured": out.measured,
                         "time_ms": out.time_s * 1e3 if out.time_s else None, "config": out.config})
    if as_json:
        click.echo(json.dumps({"kernel": kernel, "implementation": impl, "results": rows}, indent=2))
        return
    table = Table("problem", "source", "measured", "best ms", "config", title=f"{kernel}/{impl} on {device}")
    for r in rows:
        table.add_row(" ".join(f"{a}={b}" for a, b in r["problem"].items() if a not in ("dtype", "gated")),
                      r["source"], str(r["measured"]), f"{r['time_ms']:.3f}" if r["time_ms"] else "-",
                      " ".join(f"{a}={b}" for a, b in r["config"].items()))
    Console().print(table)
