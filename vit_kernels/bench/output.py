"""Where results go: run metadata, rows upserted into a CSV, a JSON per run, the table, the plots."""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path
import torch

COLUMNS = ["kind", "bench", "provider", "mode", "shape", "dtype", "status", "p20_ms", "p50_ms", "p80_ms", "unit",
           "items_per_s", "tflops", "gbps", "frac_peak_flops", "frac_peak_bw", "speedup", "baseline",
           "peak_mem_mb", "max_err", "tolerance", "runs", "flops", "bytes", "formula", "note", "backend",
           "device", "torch", "triton", "cuda", "commit", "timestamp"]
# A row is replaced by a later run of the same key, on the same device and versions or not.
KEY = ("device", "kind", "bench", "provider", "mode", "shape", "dtype")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    name = device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def metadata(device: torch.device, backend: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    meta = dict(device=device_name(device), torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda or "none", commit=_commit(), backend=backend,
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["device_properties"] = dict(sm=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                                         memory_gib=round(props.total_memory / 2**30, 1),
                                         l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    else:
        meta["device_properties"] = dict(cpus=os.cpu_count(), threads=torch.get_num_threads())
    return meta


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def upsert_csv(path: Path, rows: list[dict], meta: dict) -> list[dict]:
    """Merge ``rows`` (stamped with ``meta``) into the CSV at ``path``; returns every row now in it."""
    stamped = [{**{k: meta[k] for k in ("device", "torch", "triton", "cuda", "commit", "timestamp", "backend")},
                "unit": "ms", **row} for row in rows]
    existing = []
    if path.exists():
        with path.open(newline="") as f:
            existing = list(csv.DictReader(f))
    merged = {tuple(r.get(k, "") for k in KEY): r for r in existing}
    for row in stamped:
        merged[tuple(_fmt(row.get(k)) for k in KEY)] = {c: _fmt(row.get(c)) for c in COLUMNS}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged.values())
    tmp.replace(path)
    return list(merged.values())


def write_json(out_dir: Path, meta: dict, rows: list[dict]) -> Path:
    path = out_dir / f"run-{meta['timestamp'].replace(':', '').replace('+0000', 'Z')}.json"
    path.write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str) + "\n")
    return path


def table(rows: list[dict]) -> str:
    header = f"{'bench':<28} {'mode':<9} {'shape':<24} {'dtype':<8} {'provider':<26} {'p50 ms':>9} " \
             f"{'p20-p80':>17} {'throughput':>16} {'peak':>6} {'speedup':>7} {'mem MiB':>8} {'rel err':>8}  status"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.get("status") == "ok":
            spread = f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
            if r.get("items_per_s"):
                thr = f"{r['items_per_s']:.1f} img/s"
            elif r.get("tflops"):
                thr = f"{r['tflops']:.2f} TFLOP/s" if r["tflops"] >= 1 else f"{1e3 * r['tflops']:.1f} GFLOP/s"
            else:
                thr = f"{r.get('gbps', 0):.2f} GB/s"
            frac = r.get("frac_peak_flops") if r.get("tflops") else r.get("frac_peak_bw")
            peak = f"{100 * frac:.0f}%" if frac is not None else ""
            mem = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") is not None else ""
            lines.append(f"{r['bench']:<28} {r['mode']:<9} {r['shape']:<24} {r['dtype']:<8} {r['provider']:<26} "
                         f"{r['p50_ms']:>9.3f} {spread:>17} {thr:>16} {peak:>6} {r.get('speedup', 0):>6.2f}x {mem:>8} "
                         f"{r.get('max_err', 0):>8.1e}  ok")
        else:
            lines.append(f"{r['bench']:<28} {r['mode']:<9} {r['shape']:<24} {r['dtype']:<8} {r['provider']:<26} "
                         f"{'-':>9} {'':>17} {'':>16} {'':>6} {'':>7} {'':>8} {'':>8}  {r.get('status')}: {r.get('note', '')}")
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per (bench, mode, dtype): time or throughput per shape and provider, and speed-up bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (or vit_kernels[bench]); "
                          "the CSV and JSON were written") from None
    groups: dict = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("p50_ms") not in (None, ""):
            groups.setdefault((r["kind"], r["bench"], r["mode"], r["dtype"]), []).append(r)
    paths = []
    for (kind, bench, mode, dtype), group in groups.items():
        shapes = list(dict.fromkeys(r["shape"] for r in group))
        providers = list(dict.fromkeys(r["provider"] for r in group))
        width = 0.8 / len(providers)
        fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(shapes) + 6), 4.5))
        for i, provider in enumerate(providers):
            xs, ys, lo, hi, sp = [], [], [], [], []
            for j, shape in enumerate(shapes):
                r = next((r for r in group if r["shape"] == shape and r["provider"] == provider), None)
                if r is None:
                    continue
                p20, p50, p80 = (float(r[k]) for k in ("p20_ms", "p50_ms", "p80_ms"))
                xs.append(j + i * width)
                ys.append(p50)
                lo.append(p50 - p20)
                hi.append(p80 - p50)
                sp.append(float(r["speedup"]) if r.get("speedup") not in (None, "") else 0.0)
            ax_t.bar(xs, ys, width, yerr=[lo, hi], label=provider)
            ax_s.bar(xs, sp, width, label=provider)
        for ax, title in ((ax_t, "median ms (p20-p80), lower is better"),
                          (ax_s, f"speed-up over {group[0]['baseline']}, higher is better")):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=20, fontsize=7)
            ax.set_title(title, fontsize=9)
        ax_s.axhline(1.0, color="black", linewidth=0.8)
        ax_t.legend(fontsize=7)
        fig.suptitle(f"{bench} {mode} {dtype} on {group[0]['device']}", fontsize=10)
        fig.tight_layout()
        path = out_dir / "plots" / f"{kind}-{bench}-{mode}-{dtype}.png".replace("+", "_")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
