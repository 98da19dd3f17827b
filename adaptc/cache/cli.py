"""`adaptc cache stats|list|export|import|clear`: look after the tuning cache from a shell.

Every command takes `--json` (one JSON document on stdout, warnings on stderr) and `--url`, which
overrides $ADAPTC_CACHE_URL, either before the command (`adaptc cache --url … stats`) or after it.

Unlike the compiler, which carries on without a shared cache that is down, these commands are aimed
at the cache: one that cannot be reached is an error (before `export`, `import` and `clear` change
anything), and a command that fails prints nothing on stdout: a half table or an empty document would
read as "no records". Each command returns what it would print; it is printed once the cache has
answered everything.
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
import warnings
from typing import Any, Callable, Iterator

import click

from adaptc.cache.record import kernel_matches, redact_url
from adaptc.cache.tiered import CacheWarning, TuningCache, open_cache
from adaptc.errors import CacheError

_URL_META = "adaptc.cache.url"


def _options(fn: Callable) -> Callable:
    @click.option("--url", default=None, help="Cache URL (sqlite:///…, redis://…, postgresql://…); "
                                               "default $ADAPTC_CACHE_URL, else the local SQLite file.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
    @click.pass_context
    @functools.wraps(fn)
    def wrapper(ctx: click.Context, url: str | None, as_json: bool, **kwargs: Any) -> None:
        url = url if url is not None else ctx.meta.get(_URL_META)
        with _reporting_warnings(), _opened(url) as cache:
            show = fn(cache, as_json, **kwargs)
            if cache.failures:  # a part of the cache was left out or refused a write: not a success
                raise CacheError("; ".join(f"the {t} tuning cache failed: {e}" for t, e in cache.failures.items()))
            if show is not None:
                show()
    return wrapper


def _require(cache: TuningCache, shared: bool = True) -> None:
    """Fail before changing anything when a store the command acts on cannot be reached."""
    try:
        cache.check(shared)
    except CacheError as e:
        raise click.ClickException(f"nothing was changed: {e}") from None


@contextlib.contextmanager
def _opened(url: str | None) -> Iterator[TuningCache]:
    try:
        cache = open_cache(url)
    except CacheError as e:
        raise click.ClickException(str(e)) from None
    try:
        yield cache
    except CacheError as e:
        raise click.ClickException(str(e)) from None
    finally:
        cache.close()


@contextlib.contextmanager
def _reporting_warnings() -> Iterator[None]:
    # On a terminal a cache warning is one line, not Python's "file:line: CacheWarning" with source.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheWarning)
        try:
            yield
        finally:
            for w in caught:
                click.echo(f"warning: {w.message}", err=True)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _console() -> Any:
    from rich.console import Console

    # Made per command: CliRunner swaps sys.stdout between commands. Off a terminal rich would wrap at
    # 80 columns; a file or a pipe gets lines as long as they are.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 100_000)


@click.group("cache")
@click.option("--url", default=None, help="Cache URL for every command; default $ADAPTC_CACHE_URL.")
@click.pass_context
def cache(ctx: click.Context, url: str | None) -> None:
    """Inspect, move and clear tuned kernel configs."""
    if url is not None:
        ctx.meta[_URL_META] = url


@cache.command()
@_options
def stats(cache: TuningCache, as_json: bool) -> Callable[[], None]:
    """How many records each tier holds, by kernel and device."""
    from adaptc.tuner.device import device_fingerprint

    tiers, scan = cache.stats(), cache.scan()  # stats first: a tier that is down shows with its error
    kernels: dict[str, int] = {}
    devices: dict[str, int] = {}
    for r in scan.records:
        kernels[r.key.kernel] = kernels.get(r.key.kernel, 0) + 1
        devices[r.key.device] = devices.get(r.key.device, 0) + 1
    data = {"local": tiers["local"], "shared": tiers["shared"], "records": len(scan.records),
            "invalid": len(scan.invalid), "kernels": kernels, "devices": devices,
            "this_device": device_fingerprint("cpu").id}
    if as_json:
        return lambda: _echo_json(data)
    return lambda: _print_stats(tiers, data, kernels)


def _print_stats(tiers: dict[str, Any], data: dict[str, Any], kernels: dict[str, int]) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title="tuning cache", show_header=True)
    for col in ("tier", "kind", "where", "records"):
        table.add_column(col)
    for tier in ("local", "shared"):
        info = tiers[tier]
        if info is not None:
            where = info.get("path") or info["url"]
            table.add_row(tier, info["kind"], where, str(info.get("records", info.get("error", "?"))))
    console.print(table)
    console.print(f"{data['records']} valid records, {data['invalid']} unreadable; this machine's CPU is "
                  f"{data['this_device']}")
    for name, n in sorted(kernels.items()):
        console.print(f"  {name}: {n}")


@cache.command(name="list")
@click.option("--kernel", default=None, help="Only records of this kernel (fused_moe: every implementation).")
@click.option("--device", default=None, help="Only records for this device id.")
@_options
def list_(cache: TuningCache, as_json: bool, kernel: str | None, device: str | None) -> Callable[[], None]:
    """Every record: kernel, problem, device, chosen config and its time. A table on a terminal; in a
    pipe or a file, one tab-separated record a line under a header line (the count goes to stderr)."""
    scan = cache.scan()
    records = sorted((r for r in scan.records if (kernel is None or kernel_matches(r.key.kernel, kernel))
                      and (device is None or r.key.device == device)),
                     key=lambda r: (r.key.kernel, r.key.device, r.key.dtype, repr(r.key.problem)))
    if as_json:
        data = {"records": [{"digest": r.key.digest, **r.to_dict()} for r in records], "invalid": scan.invalid}
        return lambda: _echo_json(data)
    rows = [(r.key.kernel, _pairs(dict(r.key.problem)), r.key.dtype, r.key.device, _pairs(r.config),
             _seconds(r.time_s), r.status) for r in records]
    count = f"{len(records)} records" + (f"; {len(scan.invalid)} unreadable (see --json)" if scan.invalid else "")
    return lambda: _print_list(rows, count)


_LIST_COLUMNS = ("kernel", "problem", "dtype", "device", "config", "time", "status")


def _print_list(rows: list[tuple[str, ...]], count: str) -> None:
    if not sys.stdout.isatty():  # for grep, cut and awk: no box, no wrapping, nothing but records
        for row in (_LIST_COLUMNS, *rows):
            click.echo("\t".join(row))
        click.echo(count, err=True)
        return
    from rich.table import Table

    console = _console()
    table = Table(show_header=True)
    for col in _LIST_COLUMNS:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(count)


@cache.command(name="export")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--kernel", default=None, help="Only records of this kernel (fused_moe: every implementation).")
@click.option("--device", "device", default="cpu", show_default=True,
              help="The device to name in the bundle's header (cpu or cuda[:N]).")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@_options
def export_(cache: TuningCache, as_json: bool, file: str, kernel: str | None, device: str,
            force: bool) -> Callable[[], None]:
    """Write the cache's records to a JSON bundle FILE, - for stdout (never over an existing file
    without --force, never over a database)."""
    from adaptc.cache.bundle import STDIO, export_bundle

    _require(cache)
    report = export_bundle(cache, file, kernel=kernel, device=device, overwrite=force)
    to_stderr = file == STDIO  # stdout holds the bundle itself
    if as_json:
        return lambda: click.echo(json.dumps(vars(report), indent=2, sort_keys=True), err=to_stderr)
    skipped = f" ({report.skipped_invalid} unreadable records left out)" if report.skipped_invalid else ""
    return lambda: click.echo(f"exported {report.exported} records to {report.path}{skipped}", err=to_stderr)


@cache.command(name="import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@_options
def import_(cache: TuningCache, as_json: bool, file: str) -> Callable[[], None]:
    """Add the records of a JSON bundle FILE (- for stdin). A record already present is kept, never replaced."""
    from adaptc.cache.bundle import import_bundle

    _require(cache)
    report = import_bundle(cache, file)

    def show() -> None:
        if as_json:
            _echo_json(report.to_dict())
        else:
            click.echo(f"imported {report.imported}, already present {report.already_present}, "
                       f"skipped invalid {report.skipped_invalid} from {report.path}")
            for problem in report.problems[:10]:
                click.echo(f"  skipped {problem}", err=True)
            for kept in report.kept[:10]:
                click.echo(f"  {kept}", err=True)
            if len(report.kept) > 10 or len(report.problems) > 10:
                click.echo("  … (see --json for every one)", err=True)
        if report.skipped_invalid and not (report.imported or report.already_present):  # the report says why
            raise click.ClickException(f"no valid records in {report.path}: all {report.skipped_invalid} were skipped")
    return show


@cache.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--local-only", is_flag=True, help="Leave the shared cache alone.")
@_options
def clear(cache: TuningCache, as_json: bool, yes: bool, local_only: bool) -> Callable[[], None]:
    """Delete every record (of this schema version)."""
    _require(cache, shared=not local_only)
    stores = {"local": cache.local, **({"shared": cache.shared} if cache.shared is not None and not local_only else {})}
    where = " and ".join(f"{t} {getattr(b, 'path', None) or redact_url(b.url)}" for t, b in stores.items())
    if not yes:
        click.confirm(f"Delete every tuning record from {where}?", abort=True, err=True)
    removed = cache.clear(shared=not local_only)
    if as_json:
        return lambda: _echo_json({"removed": removed})
    return lambda: click.echo(", ".join(f"removed {n} from {t}" for t, n in removed.items()))


def _pairs(d: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(dict(d).items()))


def _seconds(t: float | None) -> str:
    if t is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


if __name__ == "__main__":
    cache()
