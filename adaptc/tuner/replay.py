"""Replay tables: every config of a space timed once per problem, so searches can be compared offline.

A table is JSON: the kernel, implementation and device fingerprint it was recorded on, and per
problem the trial of every config (time or failure). `replay_measure` answers a search from the
table instead of the device, so CI compares random search, TPE and cost model + TPE without a GPU.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..cache import Trial, TuningRecord
from ..kernels._registry import KERNELS
from .device import DeviceFingerprint, device_fingerprint
from .timing import interleaved_ms
from .tune import Budget, Measure, best_trial, canonical, checked_runner, key_for

FORMAT = "adaptc-replay"
VERSION = 1


def record_table(kernel: str, impl: str, problems: Iterable[tuple], budget: Budget = Budget(), rounds: int = 5,
                 on_problem: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Check every config that fits, for each argument tuple in `problems`, and time those that pass
    in `rounds` interleaved rounds (`budget.seconds_per_trial` each in all): a burst of load from
    another process then falls on every config alike, not on the few that ran during it."""
    k = KERNELS[kernel]
    space = k.implementations[impl].space
    entries, device = [], None
    for i, args in enumerate(problems):
        device = args[0].device
        check, run = checked_runner(kernel, impl, args)
        configs = {canonical(c): c for c in space.configs(*args)}
        failed = {key: check(c) for key, c in configs.items()}
        with torch.no_grad():
            ms, _ = interleaved_ms({key: functools.partial(run, c) for key, c in configs.items() if failed[key] is None},
                                   device.type, seconds=budget.seconds_per_trial, rounds=rounds)
        trials = [failed[key] or Trial(c, ms[key] / 1e3) for key, c in configs.items()]
        entries.append({"problem": k.problem(*args), "trials": [t.to_dict() for t in trials]})
        if on_problem:
            on_problem(i)
    return {"format": FORMAT, "version": VERSION, "kernel": kernel, "implementation": impl,
            "device": device_fingerprint(device or "cpu").to_dict(), "problems": entries}


def load_table(path: str | Path) -> dict[str, Any]:
    table = json.loads(Path(path).read_text())
    if table.get("format") != FORMAT or table.get("version") != VERSION:
        raise ValueError(f"{path}: not an {FORMAT} table of version {VERSION}")
    return table


def trials_of(entry: dict[str, Any]) -> list[Trial]:
    return [Trial(t["config"], t["time_s"], t["status"]) for t in entry["trials"]]


def replay_measure(entry: dict[str, Any]) -> Measure:
    """A Measure that looks configs up in one problem's recorded trials."""
    by_config = {canonical(dict(t.config)): t for t in trials_of(entry)}
    return lambda config: by_config[canonical(config)]


def measurements_to_near_best(trials: list[Trial], best: float, within: float = 1.05) -> int:
    """How many of `trials` (in the order run) it took to find a config within `within` of `best`;
    one more than were run if none was."""
    for i, t in enumerate(trials, 1):
        if t.status == "ok" and t.time_s <= within * best:
            return i
    return len(trials) + 1


def best_time(entry: dict[str, Any]) -> float:
    return best_trial(trials_of(entry)).time_s


def as_records(table: dict[str, Any]) -> list[TuningRecord]:
    """The table as tuning records (one per problem), e.g. to train the cost model on."""
    device = DeviceFingerprint.from_dict(table["device"])
    records = []
    for entry in table["problems"]:
        trials = trials_of(entry)
        best = best_trial(trials)
        key = key_for(table["kernel"], table["implementation"], entry["problem"], device)
        records.append(TuningRecord(key, dict(best.config) if best else {}, best.time_s if best else None,
                                    "ok" if best else "crashed", tuple(trials)))
    return records
