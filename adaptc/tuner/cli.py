"""`adaptc tune`: tune kernels ahead of time, on this machine or as one of many workers."""
from __future__ import annotations

import itertools
import json

import click


def _value(text: str):
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def _parse_problem(text: str) -> dict:
    out = {}
    for part in text.split(","):
        name, _, value = (x.strip() for x in part.partition("="))
        if not name or not value:
            raise click.BadParameter(f"{part!r} is not NAME=VALUE")
        if name in out:
            raise click.BadParameter(f"{name} is given twice in {text!r}")
        out[name] = _value(value)
    return out


def _parse_sweep(text: str) -> tuple[str, list]:
    name, _, values = (x.strip() for x in text.partition("="))
    parts = [v.strip() for v in values.split(",")]
    if not name or not all(parts):
        raise click.BadParameter(f"{text!r} is not NAME=V1,V2,...")
    return name, list(dict.fromkeys(_value(v) for v in parts))


def _show(problem: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in problem.items() if k != "dtype")


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise click.BadParameter(f"{name!r} is not cpu, cuda or cuda:N", param_hint="--device")
    if name != "cpu" and not torch.cuda.is_available():
        raise click.BadParameter(f"{name}: torch sees no CUDA device on this machine", param_hint="--device")
    return name


@click.command("tune")
@click.argument("kernel", required=False)
@click.option("--problem", "problems", multiple=True, metavar="NAME=V,...",
              help="One problem of KERNEL, e.g. H=1024,I=3584,E=8,K=2 for fused_moe or "
                   "B=1,Hq=8,Hkv=2,Lq=1024,Lk=1024,D=64,causal=true,window=0 for attention (repeatable).")
@click.option("--sweep", "sweeps", multiple=True, metavar="NAME=V1,V2,...",
              help="Tune every --problem at each of these values of NAME, e.g. T=1,16,128 (repeatable: a grid).")
@click.option("--tokens", multiple=True, type=click.IntRange(min=1),
              help="Shorthand for --sweep T=...: token counts (fused_moe).")
@click.option("--hf-config", type=click.Path(exists=True), default=None,
              help="Instead of KERNEL: tune every kernel a Hugging Face model built from this config (a config.json "
                   "or a folder with one; random weights: shapes are what matter) calls at --batch x --seq tokens.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="With --hf-config: batch size.")
@click.option("--seq", "seqs", multiple=True, type=click.IntRange(min=1),
              help="With --hf-config: sequence lengths (default 1 and 128).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Default: bfloat16 on GPU, float32 on CPU.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one).")
@click.option("--trials", default=24, show_default=True, type=click.IntRange(min=1),
              help="Measurements per problem, at most.")
@click.option("--seconds", default=60.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Wall time per problem, at most.")
@click.option("--strategy", type=click.Choice(["model+tpe", "tpe", "random", "exhaustive"]), default="model+tpe",
              show_default=True)
@click.option("--storage", default=None, metavar="URL",
              help="Optuna storage shared by workers (postgresql://… or redis://…; sqlite:///… for processes of "
                   "one machine): run this same command on several machines and they split the trials; no config "
                   "is measured twice. Works with --hf-config too.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def tune_command(kernel, problems, sweeps, tokens, hf_config, batch, seqs, dtype, device, trials, seconds, strategy,
                 storage, as_json):
    """Tune KERNEL's --problem list (or a model's kernels, --hf-config) ahead of time; results go to the cache.

    \b
    adaptc tune fused_moe --problem H=1024,I=3584,E=8,K=2 --tokens 16 --tokens 128
    adaptc tune attention --problem B=1,Hq=8,Hkv=2,D=64,causal=true,window=0 --sweep Lq=1,1024 --sweep Lk=4096
    adaptc tune --hf-config path/to/config.json --seq 1 --seq 512
    """
    from ..errors import StorageError
    from .tune import Budget, optuna_storage

    if hf_config and (kernel or problems or sweeps or tokens):
        raise click.UsageError("--hf-config tunes the kernels a model calls: KERNEL, --problem, --sweep and "
                               "--tokens do not go with it")
    device = _device(device)
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        store = optuna_storage(storage)  # before any work: a dead server fails the command at once
    except StorageError as e:
        raise click.ClickException(str(e)) from None
    budget = Budget(trials=trials, seconds=seconds)
    if hf_config:
        _tune_model(hf_config, batch, seqs or (1, 128), dtype, device, budget, strategy, store, as_json)
        return
    from ..kernels import KERNELS

    tunable = ", ".join(n for n, k in KERNELS.items() if k.example)
    if kernel is None:
        raise click.UsageError(f"give a KERNEL ({tunable}) with --problem, or --hf-config")
    if kernel not in KERNELS or KERNELS[kernel].example is None:
        raise click.BadParameter(f"unknown kernel {kernel!r}; tunable: {tunable} (or --hf-config)")
    if not problems:
        raise click.BadParameter("give at least one --problem (or --hf-config)")
    grid = [_parse_sweep(s) for s in sweeps] + ([("T", list(dict.fromkeys(tokens)))] if tokens else [])
    names = [n for n, _ in grid]
    if len(set(names)) < len(names):
        raise click.BadParameter("a name is swept twice (--tokens sweeps T)")
    jobs = []
    for text in problems:
        problem = _parse_problem(text)
        if set(problem) & set(names):
            raise click.BadParameter(f"{', '.join(sorted(set(problem) & set(names)))} is in --problem {text!r} and "
                                     "is swept too")
        jobs += [{"dtype": dtype, **problem, **dict(zip(names, values))}
                 for values in itertools.product(*(v for _, v in grid))]
    for job in jobs:  # every problem checked before any is tuned
        try:
            KERNELS[kernel].check(job)
        except ValueError as e:
            raise click.BadParameter(f"{kernel} problem {_show(job)}: {e}", param_hint="--problem") from None
    rows = _tune_jobs(kernel, jobs, device, budget, strategy, store, as_json)
    impl = "triton" if device == "cuda" else "cpu"
    if as_json:
        click.echo(json.dumps({"kernel": kernel, "implementation": impl, "results": rows}, indent=2))
        return
    _print_table(f"{kernel}/{impl} on {device}", rows)


def _tune_jobs(kernel, jobs, device, budget, strategy, store, as_json) -> list[dict]:
    from ..cache import default_cache
    from ..kernels import KERNELS
    from ..progress import Steps
    from .cost_model import NO_LIGHTGBM, CostModel, have_lightgbm
    from .device import device_fingerprint
    from .tune import tune

    k = KERNELS[kernel]
    impl = "triton" if device == "cuda" else "cpu"
    cache = default_cache()
    fp = device_fingerprint(device)
    model = None
    if strategy == "model+tpe" and not have_lightgbm():
        click.echo(f"note: {NO_LIGHTGBM}", err=True)  # as compile does: the model only orders the search
    elif strategy == "model+tpe":
        model = CostModel.train(kernel, impl, cache.scan().records, device=fp.id, units=fp.units)
    rows = []
    with Steps(f"tuning {kernel}/{impl}", len(jobs) * budget.trials, False if as_json else None) as steps:
        for job in jobs:
            args = k.example(dict(job), device)
            out = tune(kernel, impl, args, cache=cache, budget=budget, strategy=strategy, cost_model=model,
                       storage=store, on_trial=lambda _: steps.advance())
            steps.advance(budget.trials - out.measured)
            rows.append({"problem": out.problem, "source": out.source, "measured": out.measured,
                         "time_ms": out.time_s * 1e3 if out.time_s else None, "config": out.config})
        steps.done = f"tuned {len(rows)} {kernel}/{impl} problem(s): {sum(r['measured'] for r in rows)} measurements"
    return rows


def _tune_model(path, batch, seqs, dtype, device, budget, strategy, store, as_json) -> None:
    import torch

    import adaptc
    from ..capture.inputs import position_limit
    from ..errors import AdaptcError
    from .session import tune_calls

    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError:
        raise click.UsageError("--hf-config needs transformers (pip install 'adaptc[hf]')") from None
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f"{path} is not a Hugging Face config: {e}") from None
    limit = position_limit(config)
    if limit and max(seqs) > limit[0]:
        raise click.BadParameter(f"--seq {max(seqs)} is longer than the model takes ({limit[1]} = {limit[0]})",
                                 param_hint="--seq")
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config)
    except ValueError:
        model = AutoModel.from_config(config)
    model = model.to(device, getattr(torch, dtype)).eval()
    vocab = getattr(config, "vocab_size", 1000)
    kernels, totals = [], {"measured": 0, "cache_hits": 0}
    for seq in seqs:
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        try:  # compile's rewrites decide which kernels run; this command's options decide how they are tuned
            fast = adaptc.compile(model, example_inputs=(ids,), tune=False)
        except AdaptcError as e:
            raise click.ClickException(str(e)) from None
        tuning = tune_calls(lambda: fast(ids), budget, strategy=strategy, storage=store,
                            progress=False if as_json else None)
        totals = {k: totals[k] + tuning[k] for k in totals}
        kernels += [{"seq": seq, **k} for k in tuning["kernels"]]
    if as_json:
        click.echo(json.dumps({"model": type(model).__name__, **totals, "kernels": kernels}, indent=2, default=str))
        return
    rows = [{"problem": {"kernel": k["kernel"], "seq": k["seq"], **k.get("problem", {})}, "source": k.get("source", ""),
             "measured": k.get("measured", 0), "time_ms": (k.get("time_s") or 0) * 1e3 or None,
             "config": k.get("config") or {}} for k in kernels]
    _print_table(f"{type(model).__name__}: {totals['measured']} measured, {totals['cache_hits']} from the cache", rows)


def _print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("problem", "source", "measured", "best ms", "config", title=title)
    for r in rows:
        table.add_row(" ".join(f"{a}={b}" for a, b in r["problem"].items() if a != "dtype"),
                      r["source"], str(r["measured"]), f"{r['time_ms']:.3f}" if r["time_ms"] else "-",
                      " ".join(f"{a}={b}" for a, b in r["config"].items()))
    Console().print(table)
