"""The benchmark harness behind ``python -m vit_kernels bench`` and ``benchmarks/``.

timing.py (how a call is timed), case.py (a case and the agreement check), ops.py and models.py
(the tables of op and model benchmarks: inputs, formulas, providers), runner.py (check, time,
catch OOM per row), output.py (CSV, JSON, table, plots).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import backend
from ..ops import implementation
from .models import (MODEL_MODES, MODEL_PROVIDERS, MODELS, QUICK_MODEL_MODES, ModelPair, batches_for, model_cases,
                     valid_models)
from .ops import OP_MODES, OP_PROVIDERS, OPS, QUICK_OP_MODES, op_cases
from .output import device_slug, metadata, plot, table, upsert_csv, write_json
from .runner import run_cases
from .timing import QUICK, Budget, measure_ceilings

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


PROVIDERS = tuple(dict.fromkeys((*OP_PROVIDERS, *MODEL_PROVIDERS)))


class PlanError(ValueError):
    """A Plan field that cannot run, found by ``run`` before it runs anything; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class ResultsNotSaved(RuntimeError):
    """The run finished but its results could not be written to the output directory: ``rows``
    holds them, ``fallback`` the JSON written in their place (None when that failed too)."""

    def __init__(self, message: str, rows: list[dict], fallback: Optional[Path]):
        super().__init__(message)
        self.rows, self.fallback = rows, fallback


def _choose(kind: str, names: Sequence[str], valid: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise PlanError(f"{kind}s", f"unknown {kind} {', '.join(map(repr, unknown))}; "
                                    f"valid {kind}s: {', '.join(valid)}")
    return list(names)


def parse_device(name: Optional[str]) -> torch.device:
    """cpu or cuda[:N] (a device this machine has); None: cuda if available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device string at all
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise PlanError("device", f"expected cpu, cuda or cuda:N; got {name!r}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise PlanError("device", f"{name!r} asked for, but torch {torch.__version__} sees "
                                  f"{torch.cuda.device_count()} CUDA devices here")
    return device


def parse_dtypes(names: Sequence[str], device: torch.device) -> list[torch.dtype]:
    dtypes = [DTYPES[n] for n in _choose("dtype", names, list(DTYPES))]
    if torch.bfloat16 in dtypes and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PlanError("dtypes", f"bfloat16 is not supported on {torch.cuda.get_device_name(device)}; "
                                  "use float16 or float32")
    return list(dict.fromkeys(dtypes))


@dataclass
class Plan:
    """What to run. ``None`` fields take the device's defaults (see ``resolve``)."""
    ops: Optional[Sequence[str]] = None
    models: Optional[Sequence[str]] = None
    dtypes: Optional[Sequence[str]] = None
    modes: Optional[Sequence[str]] = None
    providers: Optional[Sequence[str]] = None  # keep only these (the baseline always runs: it sets the tolerance)
    batches: Optional[Sequence[int]] = None
    op_shapes: Optional[list] = None          # [(width name or (C, H), tokens, batch)]
    model_kwargs: dict = field(default_factory=dict)   # e.g. dict(img_size=32, depth=2) for a tiny test model
    quick: bool = False
    compile: Optional[bool] = None
    cuda_graphs: bool = True
    device: Optional[str] = None
    out: Optional[str] = None
    plots: bool = True
    ceilings: bool = True


def resolve(plan: Plan):
    """Check every field (raising PlanError) and fill in the device's defaults."""
    device = parse_device(plan.device)
    ops = _choose("op", plan.ops, OPS) if plan.ops is not None else list(OPS)
    models = _choose("model", plan.models, valid_models()) if plan.models is not None else ["vit_base_patch16_224"] \
        if (plan.quick or device.type != "cuda") else list(MODELS)
    dtypes = parse_dtypes(plan.dtypes or (["bfloat16"] if device.type == "cuda" else ["float32"]), device)
    modes = list(plan.modes) if plan.modes is not None else None
    if modes is not None:
        _choose("mode", modes, OP_MODES + MODEL_MODES)
    if plan.providers is not None:
        _choose("provider", plan.providers, PROVIDERS)
    if plan.batches is not None and not all(isinstance(b, int) and b > 0 for b in plan.batches):
        raise PlanError("batches", f"batch sizes must be positive ints; got {list(plan.batches)}")
    # torch.compile on a 2-core CPU takes minutes per graph: only on request there.
    compile_ = plan.compile if plan.compile is not None else (device.type == "cuda" and not plan.quick)
    quick = plan.quick or device.type != "cuda"
    return device, ops, models, dtypes, modes, compile_, quick


def run(plan: Plan, log=print) -> tuple[list[dict], Path]:
    """Run the plan; returns this run's rows and the output directory.

    Raises PlanError before anything runs, and ResultsNotSaved (after printing the table) when the
    results cannot be written at the end."""
    device, ops, models, dtypes, modes, compile_, quick = resolve(plan)
    out_dir = Path(plan.out) if plan.out else Path("benchmarks") / "results" / device_slug(device)
    _check_writable(out_dir)
    # Asking each op for its implementation also loads (or builds) the extension: before any row.
    implementations = ", ".join(f"{op}: {_impl(op, device)}" for op in ops)
    if device.type != "cuda":
        log(f"No CUDA device: timing the CPU paths only ({implementations}). The GPU kernels were NOT timed.")
    else:
        log(f"Implementations: {implementations}")
    meta = metadata(device, backend.get_backend())
    budget = QUICK if quick else Budget()
    ceilings = measure_ceilings(device, quick) if plan.ceilings else None
    if ceilings:
        meta["ceilings"] = dict(gbps=ceilings.gbps, tflops=ceilings.tflops, matmul_dtype=ceilings.matmul_dtype,
                                how=ceilings.how)
        log(f"{meta['device']}: measured ceilings {ceilings.gbps:.0f} GB/s copy, "
            f"{ceilings.tflops:.1f} TFLOP/s {ceilings.matmul_dtype} matmul")
    meta["plan"] = dict(ops=ops, models=models, dtypes=[str(d) for d in dtypes], quick=quick, compile=compile_)
    op_modes = [m for m in (modes or (QUICK_OP_MODES if quick else OP_MODES)) if m in OP_MODES]
    model_modes = [m for m in (modes or (QUICK_MODEL_MODES if quick else MODEL_MODES)) if m in MODEL_MODES]
    batches = list(plan.batches) if plan.batches else batches_for(device, quick)

    if compile_:
        _allow_recompiles()
    rows = []
    progress = _progress(len(ops) * len(dtypes) + len(models) * len(dtypes))
    for dtype in dtypes:
        for op in ops:
            cases = op_cases(op, device, dtype, op_modes, quick, compile_, plan.op_shapes)
            rows += run_cases(_keep(cases, plan.providers), budget, ceilings)
            progress.update(1)
        for name in models:
            progress.set_description(f"{name} {str(dtype).replace('torch.', '')}")
            try:
                pair = ModelPair(name, device, dtype, **plan.model_kwargs)
            except torch.OutOfMemoryError as error:
                rows.append(dict(kind="model", bench=name, provider="*", mode="*", shape="*",
                                 dtype=str(dtype).replace("torch.", ""), status="oom", note=str(error)[:160]))
                progress.update(1)
                continue
            cases = model_cases(name, device, dtype, model_modes, batches, compile_, plan.cuda_graphs, pair)
            rows += run_cases(_keep(cases, plan.providers), budget, ceilings)
            del pair, cases
            progress.update(1)
    progress.close()
    if ceilings:
        _drop_exceeded_ceilings(rows, meta, log)

    # The table first: whatever happens to the files, the numbers are on the screen.
    log(table(rows))
    try:
        notes = _save(out_dir, rows, meta, plan.plots)
    except OSError as error:
        raise _not_saved(out_dir, error, meta, rows) from None
    for note in notes:
        log(note)
    if device.type != "cuda":
        log("CPU run: the Triton kernels and the CUDA extension were not timed; run on a GPU for those numbers.")
    return rows, out_dir


def _check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and write a file there now: a directory that cannot take the results has to
    stop the run before anything is timed, not after."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise PlanError("out", f"cannot write to {out_dir}: {error.strerror or error}") from None


def _save(out_dir: Path, rows: list[dict], meta: dict, plots: bool) -> list[str]:
    """Upsert the CSV, write the run's JSON and the plots; returns what to tell the user."""
    all_rows = upsert_csv(out_dir / "results.csv", rows, meta)
    json_path = write_json(out_dir, meta, rows)
    notes = [f"results: {out_dir / 'results.csv'} (upserted), {json_path}"]
    if plots:
        try:
            pngs = plot([r for r in all_rows if r["device"] == meta["device"]], out_dir)
            notes.append(f"plots: {len(pngs)} PNG under {out_dir / 'plots'}")
        except ImportError as error:
            notes.append(str(error))
    return notes


def _not_saved(out_dir: Path, error: OSError, meta: dict, rows: list[dict]) -> ResultsNotSaved:
    """The error for results that ``out_dir`` did not take, after writing them to a temporary directory."""
    try:
        fallback = write_json(Path(tempfile.mkdtemp(prefix="vit_kernels-bench-")), meta, rows)
        where = f"saved in {fallback}"
    except OSError:
        fallback, where = None, "only in the table above"
    return ResultsNotSaved(f"could not write the results to {out_dir} ({error}); this run's {len(rows)} rows "
                           f"are {where}", rows, fallback)


def _drop_exceeded_ceilings(rows: list[dict], meta: dict, log) -> None:
    """A row faster than a measured ceiling shows that the ceiling was none: the peak column
    (fraction of the ceiling) is then left out of every row of this run rather than passing 100%."""
    for column, unit in (("frac_peak_flops", "matmul"), ("frac_peak_bw", "copy")):
        over = [r for r in rows if r.get(column, 0) > 1]
        if over:
            worst = max(over, key=lambda r: r[column])
            log(f"{worst['bench']} {worst['mode']} {worst['shape']} {worst['provider']} ran at "
                f"{100 * worst[column]:.0f}% of the measured {unit} ceiling: the peak column is left out")
            meta["ceilings"][f"{column}_left_out"] = f"{len(over)} rows above the ceiling"
            for r in rows:
                r.pop(column, None)


def _keep(cases, providers):
    if providers is None:
        return cases
    for case in cases:
        case.providers = {k: v for k, v in case.providers.items() if k in providers or k == case.baseline}
    return cases


def _allow_recompiles() -> None:
    """Every shape and mode compiles its own static graph; past dynamo's default limit (8) it would
    silently fall back to eager and the "compile" rows would time eager code."""
    import torch._dynamo
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 4096))


def _impl(op: str, device: torch.device) -> str:
    try:
        return implementation(op, device)[0]
    except Exception as error:  # the info line must not stop the run
        return f"unknown ({type(error).__name__})"


class _NoProgress:
    def update(self, n=1): pass
    def set_description(self, text): pass
    def close(self): pass


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, unit="group", leave=False)
