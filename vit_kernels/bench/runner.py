"""Runs cases: check every provider against the reference, time the ones that agree, catch OOM per row."""
from __future__ import annotations

import gc
from typing import Iterable, Optional

import torch

from .case import TOLERANCE, Case, relative_error
from .timing import Budget, Ceilings, measure


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def run_case(case: Case, budget: Budget, ceilings: Optional[Ceilings]) -> list[dict]:
    """One row per provider. status: ok | unsteady | mismatch | oom | error | unsupported."""
    rows = []
    base = dict(kind=case.kind, bench=case.bench, mode=case.mode, shape=case.shape,
                dtype=str(case.dtype).replace("torch.", ""), baseline=case.baseline,
                flops=case.flops, bytes=case.bytes, formula=case.formula, items=case.items)
    try:
        sets = [case.make_inputs() for _ in range(max(1, case.input_sets))]
        expected = case.reference(sets[0]) if case.reference is not None else None
    except torch.OutOfMemoryError as error:
        _free(case.device)
        return [dict(base, provider=p, status="oom", note="inputs or reference: " + _short(error))
                for p in case.providers]
    floor = TOLERANCE[case.dtype]
    limit, baseline_result = floor, None
    order = [case.baseline] + [p for p in case.providers if p != case.baseline]
    for provider in order:
        row = dict(base, provider=provider)
        calls = None
        try:
            calls = [case.providers[provider](s) for s in sets]
            got = calls[0]()
            if expected is None:
                # No high-precision reference fits: agree with the baseline in the same dtype.
                if provider == case.baseline:
                    baseline_result = got
                    err = 0.0
                else:
                    err = float("inf") if baseline_result is None else relative_error(got, baseline_result)
                    limit = 2 * floor
            else:
                ref = case.provider_reference[provider](sets[0]) if provider in case.provider_reference else expected
                err = relative_error(got, ref)
                if provider == case.baseline and err < float("inf"):
                    limit = max(2 * err, floor)
            row["max_err"] = err
            row["tolerance"] = limit
            del got
            if err > limit:
                row.update(status="mismatch", note=f"relative error {err:.2e} > {limit:.1e}; not timed")
            else:
                timing = measure(calls, case.device, budget)
                row.update(status="ok", p20_ms=timing.p20_ms, p50_ms=timing.p50_ms, p80_ms=timing.p80_ms,
                           runs=timing.runs, peak_mem_mb=timing.peak_mem_mb)
                _derive(row, case, ceilings)
                if not timing.steady:
                    first, second = timing.halves_ms
                    row.update(status="unsteady", note=f"median {first:.3f} ms over the first half of the timed "
                                                       f"runs, {second:.3f} ms over the second, twice: no "
                                                       "steady-state time")
        except torch.OutOfMemoryError as error:
            row.update(status="oom", note=_short(error))
        except (RuntimeError, NotImplementedError, ValueError, TypeError, AssertionError) as error:
            # An SDPA backend that does not take this dtype/shape says "No available kernel".
            unsupported = "No available kernel" in str(error) or isinstance(error, NotImplementedError)
            row.update(status="unsupported" if unsupported else "error", note=_short(error))
        except Exception as error:  # e.g. a torch.compile backend failure: the row records it, the run goes on
            row.update(status="error", note=_short(error))
        del calls
        rows.append(row)
        _free(case.device)
    del sets, expected
    _free(case.device)
    _speedups(rows)
    return rows


def _derive(row: dict, case: Case, ceilings: Optional[Ceilings]) -> None:
    seconds = row["p50_ms"] / 1e3
    if case.flops:
        row["tflops"] = case.flops / seconds / 1e12
        if ceilings:
            row["frac_peak_flops"] = row["tflops"] / ceilings.tflops
    if case.bytes:
        row["gbps"] = case.bytes / seconds / 1e9
        if ceilings:
            row["frac_peak_bw"] = row["gbps"] / ceilings.gbps
    if case.items:
        row["items_per_s"] = case.items / seconds


def _speedups(rows: list[dict]) -> None:
    base = next((r for r in rows if r["provider"] == r["baseline"] and r.get("status") == "ok"), None)
    for r in rows:
        if base is not None and r.get("status") == "ok":
            r["speedup"] = base["p50_ms"] / r["p50_ms"]


def run_cases(cases: Iterable[Case], budget: Budget, ceilings: Optional[Ceilings], progress=None) -> list[dict]:
    rows = []
    for case in cases:
        if progress is not None:
            progress.set_description(f"{case.bench} {case.mode} {case.shape} {case.dtype}".replace("torch.", ""))
        rows.extend(run_case(case, budget, ceilings))
        if progress is not None:
            progress.update(1)
    return rows
