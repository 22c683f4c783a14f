"""Assemble the sm_90 compile report: variants, rows, the gate's rules, markdown and JSON."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import json
import multiprocessing
import os
import subprocess
import time
from typing import Optional

import triton

from . import launches, sm90

# Rules a kept config must pass (--check).
MAX_SHARED = sm90.BLOCK_SHARED_MAX
TENSOR_CORE_DTYPES = ("bf16", "f16")
# The weight-gradient GEMMs of this scenario must keep this much of their last wave busy.
WAVE_SCENARIO = "ViT-B/16 train b256"
MIN_LAST_WAVE = 0.9


@dataclasses.dataclass
class Variant:
    """One specialisation of one kernel as the host launches it, before a config is chosen."""
    kernel: str
    label: str
    launch: object
    seen_in: set = dataclasses.field(default_factory=set)      # (scenario, precision)
    configs: list = dataclasses.field(default_factory=list)    # every config of the kernel
    kept: list = dataclasses.field(default_factory=list)       # those the autotuner may pick here


def _config_label(config) -> str:
    if config is None:
        return "host-chosen"
    tiles = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
    rest = ",".join(f"{k}={v}" for k, v in config.kwargs.items() if not k.startswith("BLOCK"))
    return f"{tiles} w{config.num_warps} s{config.num_stages}" + (f" {rest}" if rest else "")


def _variant_label(job: sm90.Job, tuned: set) -> str:
    """Operand dtype, the host's flags, and the integer specialisations (=1, not divisible by 16)."""
    signature = dict(job.signature)
    constexprs = {job.signature[path[0]][0]: value for path, value in job.constexprs if len(path) == 1}
    dtype = next((t[1:] for t in signature.values() if t.startswith("*")), "?")
    flags = []
    for name, value in constexprs.items():
        if name in tuned or name.startswith("stride") or signature.get(name) != "constexpr":
            continue
        if value is True:
            flags.append(name)
        elif value is not False and value is not None:
            flags.append(f"{name}={value}")
    divisible = {job.signature[path[0]][0] for path, attr in job.attrs if attr}
    ones = [n for n, v in constexprs.items() if v == 1 and signature[n] == "constexpr" and n.startswith("stride")]
    odd = [n for n, t in signature.items() if t in ("i32", "i64") and n not in divisible]
    spec = (f" | =1: {','.join(ones)}" if ones else "") + (f" | %16!=0: {','.join(odd)}" if odd else "")
    return f"{dtype} {' '.join(flags)}{spec}"


def _launch_identity(launch) -> tuple:
    """Cheap identity of a launch: equal identities specialise identically (saves binder calls)."""
    def describe(value):
        if hasattr(value, "data_ptr"):
            return ("T", str(value.dtype), tuple(value.shape), tuple(value.stride()), value.storage_offset())
        return ("V", repr(value))
    return (id(launch.kernel), tuple(describe(a) for a in launch.args),
            tuple(sorted((k, describe(v)) for k, v in launch.kwargs.items())))


def collect_variants(recorded: list[launches.Recorded]) -> dict[tuple, Variant]:
    """Group launches by specialisation, ignoring the config: one Variant per distinct compiled kernel family."""
    variants: dict[tuple, Variant] = {}
    by_identity: dict[tuple, tuple] = {}
    for rec in recorded:
        launch = rec.launch
        identity = _launch_identity(launch)
        if identity not in by_identity:
            configs = sm90.configs(launch.kernel)
            tuned = set(configs[0].all_kwargs()) if configs[0] is not None else set()
            job = sm90.specialise(launch.kernel, launch.args, launch.kwargs, configs[0])
            options = tuple((k, v) for k, v in job.options if k not in tuned)
            constexprs = tuple((p, v) for p, v in job.constexprs if job.signature[p[0]][0] not in tuned)
            key = (job.module, job.name, job.signature, constexprs, job.attrs, options)
            by_identity[identity] = key
            if key not in variants:
                variants[key] = Variant(sm90.kernel_name(launch.kernel), _variant_label(job, tuned), launch,
                                        configs=configs,
                                        kept=sm90.kept_configs(launch.kernel, launch.args, launch.kwargs))
        variants[by_identity[identity]].seen_in.add((rec.scenario, rec.precision))
    return variants


def _compile_all(jobs: list[sm90.Job], workers: int) -> dict[tuple, dict]:
    results: dict[tuple, dict] = {}
    if workers <= 1:
        return {job.key(): _timed_compile(job) for job in jobs}
    # spawn: a forked copy of a process holding torch's threads can deadlock.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_timed_compile, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future].key()] = future.result()
    return results


def _timed_compile(job: sm90.Job) -> dict:
    start = time.perf_counter()
    return {**sm90.compile_job(job), "seconds": time.perf_counter() - start}


def violations(row: dict) -> list[str]:
    """Why a kept config fails the gate (empty: it passes)."""
    if row["error"]:
        return [f"does not compile: {row['error']}"]
    found = []
    if row["shared"] > MAX_SHARED:
        found.append(f"needs {row['shared'] // 1024} KB of shared memory (> {MAX_SHARED // 1024} KB)")
    if row["stack"] or row["local_loads"] or row["local_stores"]:
        found.append(f"spills: {row['stack']} B stack, {row['local_loads']} local loads, "
                     f"{row['local_stores']} local stores")
    tensor_core_dots = [d for d in row["dots"] if d[0] in TENSOR_CORE_DTYPES or d[1] in ("tf32", "tf32x3")]
    if tensor_core_dots and (row["matrix"]["HGMMA"] == 0 or row["matrix"]["HMMA"] > 0):
        found.append(f"{len(tensor_core_dots)} tensor-core dots but {row['matrix']['HGMMA']} HGMMA, "
                     f"{row['matrix']['HMMA']} HMMA (wgmma expected)")
    return found


# Epilogue flags change what happens after the K loop, never inside it: every launch variant of
# the GEMM keeps its main loop within this factor of the leanest variant's with the same config
# (an activation derivative applied as A is loaded, the old fc1 backward, made it 12 to 24x).
GEMM_KERNEL = "vit_kernels.kernels.gemm._gemm"
MAX_MAIN_LOOP_RATIO = 1.2


def _check_gemm_main_loops(rows: list[dict]) -> None:
    """Add a violation to every GEMM row whose main loop is longer than MAX_MAIN_LOOP_RATIO times
    the shortest main loop of its config (over every variant in the report)."""
    shortest: dict[str, int] = {}
    gemm_rows = [r for r in rows if r["kernel"] == GEMM_KERNEL and not r["error"] and r["main_loop"]]
    for r in gemm_rows:
        shortest[r["config"]] = min(shortest.get(r["config"], r["main_loop"]), r["main_loop"])
    for r in gemm_rows:
        if r["main_loop"] > MAX_MAIN_LOOP_RATIO * shortest[r["config"]]:
            r["violations"].append(f"main loop {r['main_loop']} instructions, over {MAX_MAIN_LOOP_RATIO}x the "
                                   f"{shortest[r['config']]} of the plainest variant with this config")


def _matrix_label(row: dict) -> str:
    used = [op for op in ("HGMMA", "HMMA") if row["matrix"][op]]
    if used:
        return "+".join(used)
    return "FFMA" if row["dots"] else "-"


def _loads_label(row: dict) -> str:
    if row["loads"]["UTMALDG"]:
        return "TMA"
    if row["loads"]["LDGSTS"]:
        return "cp.async"
    return "ld.global"


def waves(recorded: list[launches.Recorded]) -> list[dict]:
    """How full the last round of every persistent GEMM launch of ``WAVE_SCENARIO`` (bf16) is, per
    kept config. A weight gradient (K, the tokens, longer than both output dims) below
    ``MIN_LAST_WAVE`` is a violation: its few output tiles must be split over K to fill the machine."""
    from ..kernels import gemm

    found = {}
    for rec in recorded:
        if rec.scenario != WAVE_SCENARIO or rec.precision != "bf16" or rec.launch.kernel is not gemm.gemm:
            continue
        launch = rec.launch
        args = {**dict(zip(launch.kernel.arg_names, launch.args)), **launch.kwargs}
        for config in sm90.kept_configs(launch.kernel, launch.args, launch.kwargs):
            meta = config.all_kwargs()
            count = gemm.tiles(args["M"], args["N"], args["SPLIT_K"], meta["BLOCK_M"], meta["BLOCK_N"])
            programs = launch.grid(meta)[0]
            weight_grad = args["K"] > max(args["M"], args["N"])
            last = gemm.last_wave(count, programs)
            row = dict(M=args["M"], N=args["N"], K=args["K"], split_k=args["SPLIT_K"], config=_config_label(config),
                       weight_grad=weight_grad, tiles=count, programs=programs, last_wave=round(last, 3),
                       violations=[f"last wave {last:.0%} busy (< {MIN_LAST_WAVE:.0%})"]
                       if weight_grad and last < MIN_LAST_WAVE else [])
            found[(row["M"], row["N"], row["K"], row["split_k"], row["config"])] = row
    return list(found.values())


# The backward's traffic bound, and the L2 its scratch must fit in for the traffic model to hold.
MAX_BACKWARD_TRAFFIC = 1.2
L2_BYTES = 50 * 1024 * 1024
# The MMA work bound (forward and backward over the unpadded 7 N^2 D), at ViT-B/16's shape.
MAX_MMA_WORK = 1.15
MMA_WORK_SHAPE = launches.ATTENTION_SHAPES[0]


def attention_counts(recorded: list[launches.Recorded]) -> list[dict]:
    """Executed MMA work and modelled backward DRAM traffic of the ``launches.ATTENTION_SHAPES``
    scenarios (bf16), per pair of kept (forward, backward) configs, against the unpadded minimum.

    MMA work: ``kernels.attention.forward_mma_work`` + ``backward_mma_work`` (blocks, tails and
    head-dim tiles as the kernels run them) over the unpadded 7 N^2 D per head (2 GEMMs forward,
    5 backward). Traffic: the backward reads q, k, v, o, dO and
    lse once and writes dq, dk, dv once; its per-program scratch (delta, dq^T, normalised q) is
    counted as L2-resident, which holds while all programs' slots fit in L2 (``scratch_mb`` against
    50 MB). The minimum reads q, k, v, o, dO and writes dq, dk, dv. A traffic ratio above
    ``MAX_BACKWARD_TRAFFIC`` is a violation, and so is MMA work above ``MAX_MMA_WORK`` at
    ``MMA_WORK_SHAPE``."""
    from ..kernels import attention

    names = {launches.attention_scenario_name(shape) for shape in launches.ATTENTION_SHAPES}
    by_scenario: dict[str, dict] = collections.defaultdict(dict)
    for rec in recorded:
        if rec.scenario in names and rec.precision == "bf16":
            by_scenario[rec.scenario][sm90.kernel_name(rec.launch.kernel).rsplit(".", 1)[-1]] = rec.launch
    rows = []
    for name, launched in by_scenario.items():
        fwd, bwd = launched.get("_attention_fwd"), launched.get("_attention_bwd")
        if fwd is None or bwd is None:
            continue
        args = {**dict(zip(bwd.kernel.arg_names, bwd.args)), **bwd.kwargs}
        q, heads, n = args["Q"], args["BH"], args["N"]
        d, size = q.shape[-1], q.element_size()
        minimum_mma = 7 * n * n * d
        minimum_bytes = 8 * n * d * size
        moved_bytes = minimum_bytes + 4 * n   # and lse
        traffic = moved_bytes / minimum_bytes
        programs = bwd.grid[0]
        scratch = args["SCRATCH"].numel() * 4 + args["NORMED_Q"].numel() * size
        violations = [f"backward traffic {traffic:.2f}x the minimum (> {MAX_BACKWARD_TRAFFIC}x)"] \
            if traffic > MAX_BACKWARD_TRAFFIC else []
        if scratch > L2_BYTES:
            violations.append(f"scratch of {scratch / 2**20:.0f} MB does not fit in L2: the traffic model fails")
        for fc in sm90.kept_configs(fwd.kernel, fwd.args, fwd.kwargs):
            for bc in sm90.kept_configs(bwd.kernel, bwd.args, bwd.kwargs):
                f, b = fc.all_kwargs(), bc.all_kwargs()
                tiles = (args["BLOCK_D"], args["BLOCK_E"])
                executed = attention.forward_mma_work(n, f["BLOCK_M"], f["BLOCK_N"], *tiles) + \
                    attention.backward_mma_work(n, b["BLOCK_M"], b["BLOCK_N"], *tiles, args["KEY_TAILS"])
                work = executed / minimum_mma
                gated = name == launches.attention_scenario_name(MMA_WORK_SHAPE) and work > MAX_MMA_WORK
                rows.append(dict(heads=heads, N=n, D=d, fwd=_config_label(fc), bwd=_config_label(bc),
                                 mma_work=round(work, 3), traffic=round(traffic, 3),
                                 traffic_gb=round(heads * moved_bytes / 1e9, 3),
                                 minimum_gb=round(heads * minimum_bytes / 1e9, 3), programs=programs,
                                 scratch_mb=round(scratch / 2**20, 1),
                                 violations=violations + ([f"MMA work {work:.3f}x the unpadded (> {MAX_MMA_WORK}x)"]
                                                          if gated else [])))
    return rows


@dataclasses.dataclass
class Report:
    meta: dict
    rows: list[dict]
    variants: list[dict]
    cold_start: dict
    waves: list[dict]
    attention: list[dict]

    def failures(self) -> list[dict]:
        """The gate's violations: kept configs of every variant, waves and attention counts."""
        found = [r for r in self.rows if r["kept"] and r["violations"]]
        found += [dict(kernel=v["kernel"], variant=v["label"], config="-", violations=["no kept config passes"])
                  for v in self.variants
                  if not any(r["kept"] and not r["violations"] for r in self.rows if r["variant_id"] == v["id"])]
        found += [dict(kernel="vit_kernels.kernels.gemm._gemm", variant=f"M={w['M']} N={w['N']} K={w['K']} "
                       f"SPLIT_K={w['split_k']}", config=w["config"], violations=w["violations"])
                  for w in self.waves if w["violations"]]
        found += [dict(kernel="vit_kernels.kernels.attention", variant=f"N={a['N']} D={a['D']}",
                       config=f"{a['fwd']} / {a['bwd']}", violations=a["violations"])
                  for a in self.attention if a["violations"]]
        return found


def _toolchain() -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    try:
        version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except OSError as error:
        version = f"unknown ({error})"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    import torch
    return dict(triton=triton.__version__, torch=torch.__version__, ptxas=version, commit=commit,
                target="sm_90 (cuda, warp size 32)")


def cold_start(results: dict, seconds_per_compile: float) -> dict:
    """What a fresh GPU machine compiles before ``bench --models vit_base_patch16_224`` times anything."""
    recorded = launches.record(launches.benchmark_scenarios(), ("bf16",))
    keys, jobs, runs = set(), set(), 0
    per_kernel = collections.Counter()
    for rec in recorded:
        launch = rec.launch
        key = sm90.autotune_key(launch.kernel, launch.args, launch.kwargs)
        ident = (sm90.kernel_name(launch.kernel), key)
        kept = sm90.kept_configs(launch.kernel, launch.args, launch.kwargs)
        if key is not None and ident not in keys:
            keys.add(ident)
            runs += len(kept)
            per_kernel[ident[0]] += 1
        for config in kept:
            jobs.add(sm90.specialise(launch.kernel, launch.args, launch.kwargs, config).key())
    return dict(scenarios=[s.name for s in launches.benchmark_scenarios()], autotune_keys=len(keys),
                keys_per_kernel=dict(per_kernel), configs_benchmarked=runs, compilations=len(jobs),
                estimated_minutes=round(len(jobs) * seconds_per_compile / 60, 1))


def build(precisions: tuple[str, ...], all_configs: bool, workers: int, kernels: Optional[list[str]] = None,
          log=print) -> Report:
    """Record, specialise, compile and read every variant in ``precisions``: the configs the
    autotuner may pick for it, or with ``all_configs`` the pruned ones too (to show why)."""
    started = time.perf_counter()
    recorded = launches.record(launches.scenarios(), precisions)
    variants = collect_variants(recorded)
    if kernels:
        variants = {k: v for k, v in variants.items() if any(name in v.kernel for name in kernels)}
    log(f"{len(recorded)} launches recorded in {time.perf_counter() - started:.1f} s: "
        f"{len(variants)} variants of {len({v.kernel for v in variants.values()})} kernels")

    planned = []  # (variant id, variant, config, kept, job)
    for vid, variant in enumerate(variants.values()):
        kept = [sm90.specialise(variant.launch.kernel, variant.launch.args, variant.launch.kwargs, c).key()
                for c in variant.kept]
        for config in (variant.configs if all_configs else variant.kept):
            job = sm90.specialise(variant.launch.kernel, variant.launch.args, variant.launch.kwargs, config)
            planned.append((vid, variant, config, job.key() in kept, job))
    jobs = list({job.key(): job for *_, job in planned}.values())
    log(f"compiling {len(jobs)} kernels for sm_90 in {workers} processes")
    started = time.perf_counter()
    results = _compile_all(jobs, workers)
    elapsed = time.perf_counter() - started
    seconds = [r["seconds"] for r in results.values()]
    mean_seconds = sum(seconds) / max(1, len(seconds))
    log(f"compiled in {elapsed:.0f} s ({mean_seconds:.1f} s per kernel in one process)")

    rows = []
    for vid, variant, config, kept, job in planned:
        result = results[job.key()]
        row = dict(kernel=variant.kernel, variant=variant.label, variant_id=vid, config=_config_label(config),
                   num_warps=dict(job.options)["num_warps"], num_stages=dict(job.options)["num_stages"],
                   kept=kept, **{k: v for k, v in result.items() if k != "seconds"})
        row["violations"] = violations(row)
        rows.append(row)
    _check_gemm_main_loops(rows)
    variant_rows = [dict(id=vid, kernel=v.kernel, label=v.label,
                         seen_in=sorted(f"{s} [{p}]" for s, p in v.seen_in),
                         configs=len(v.configs), kept=[_config_label(c) for c in v.kept])
                    for vid, v in enumerate(variants.values())]
    meta = dict(**_toolchain(), configs="all" if all_configs else "kept", precisions=list(precisions),
                date=datetime.date.today().isoformat(), compile_seconds=round(elapsed, 1), workers=workers,
                mean_compile_seconds=round(mean_seconds, 2))
    return Report(meta, rows, variant_rows, cold_start(results, mean_seconds), waves(recorded),
                  attention_counts(recorded))


def to_json(report: Report) -> str:
    return json.dumps(dict(meta=report.meta, cold_start=report.cold_start, waves=report.waves,
                           attention=report.attention,
                           variants=report.variants, rows=report.rows, failures=report.failures()),
                      indent=1, default=str)


def to_markdown(report: Report, command: str) -> str:
    m = report.meta
    out = [f"# sm_90 compile report: triton {m['triton']}", "",
           f"Compiled for {m['target']} with no GPU by `{command}`: every Triton kernel, every launch variant "
           f"the host code makes in the scenarios below, and {'every' if m['configs'] == 'all' else 'every kept'} "
           "autotune config.", "",
           f"triton {m['triton']}, torch {m['torch']}, ptxas: {m['ptxas']}; commit {m['commit']}; {m['date']}; "
           f"precisions {', '.join(m['precisions'])}; {len(report.rows)} rows, compiled in {m['compile_seconds']} s "
           f"with {m['workers']} processes ({m['mean_compile_seconds']} s per kernel).", "",
           "Columns: regs = registers per thread; stack = spill bytes; LDL/STL = local loads/stores in the SASS; "
           "smem = dynamic shared memory; MMA = tensor-core instructions (HGMMA = Hopper wgmma, HMMA = older "
           "mma.sync, FFMA = dots on the FMA units); loads = TMA, cp.async or plain global loads; loop = SASS "
           "instructions per main-loop iteration (per warp); CTA/SM = resident blocks allowed. "
           "kept = the autotuner may pick it for this variant; pruned configs are shown for what they would cost.", ""]
    failures = report.failures()
    out += ["## Gate", "", f"**{'PASS' if not failures else 'FAIL'}**: {len(failures)} violations in kept configs.", ""]
    for f in failures:
        out.append(f"- {f['kernel']} [{f['variant']}] {f['config']}: {'; '.join(f['violations'])}")
    c = report.cold_start
    per_kernel = ", ".join(f"{kernel.rsplit('.', 1)[-1]} {n}" for kernel, n in c["keys_per_kernel"].items())
    out += ["", "## Cold start of the ViT-B/16 benchmark (bf16)", "",
            f"{c['autotune_keys']} autotune keys ({per_kernel}), "
            f"{c['configs_benchmarked']} configs benchmarked, {c['compilations']} distinct compilations: "
            f"about {c['estimated_minutes']} min of compiling in one process at this run's mean compile time "
            f"({report.meta['mean_compile_seconds']} s; lower when Triton's cache already held some).", ""]
    out += [f"## Waves of the persistent GEMM: {WAVE_SCENARIO} (bf16)", "",
            "One program per SM walks the tiles: the last round keeps `last wave` of them busy. Weight "
            f"gradients (dW, K = tokens) are split over K until it is at least {MIN_LAST_WAVE:.0%}.", "",
            "| M | N | K | dW | split-K | config | tiles | programs | last wave | verdict |",
            "|---:|---:|---:|:-:|---:|---|---:|---:|---:|---|"]
    for w in report.waves:
        out.append(f"| {w['M']} | {w['N']} | {w['K']} | {'yes' if w['weight_grad'] else ''} | {w['split_k']} | "
                   f"{w['config']} | {w['tiles']} | {w['programs']} | {w['last_wave']:.0%} | "
                   f"{'; '.join(w['violations']) or 'ok'} |")
    out += ["", "## Attention work and traffic: attention(q, k, v) fwd+bwd, (B, H, N, D) contiguous (bf16)", "",
            "MMA work executed (blocks, tails and head-dim tiles as the kernels run them) over the unpadded "
            f"7 N^2 D per head, gated at {MAX_MMA_WORK}x at (B, H, N, D) = {MMA_WORK_SHAPE}; backward DRAM "
            "traffic over the minimum (q, k, v, o, dO read, dq, dk, dv written once), its per-program "
            f"scratch counted as L2-resident, gated at {MAX_BACKWARD_TRAFFIC}x.", "",
            "| B*H | N | D | forward | backward | MMA work | bwd traffic | GB (min) | programs | scratch MB | verdict |",
            "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for a in report.attention:
        out.append(f"| {a['heads']} | {a['N']} | {a['D']} | {a['fwd']} | {a['bwd']} | {a['mma_work']:.3f}x | "
                   f"{a['traffic']:.3f}x | {a['traffic_gb']} ({a['minimum_gb']}) | {a['programs']} | "
                   f"{a['scratch_mb']} | {'; '.join(a['violations']) or 'ok'} |")
    out += ["", "## Summary", "", "| kernel | variants | configs | kept rows | pruned rows | violations |",
            "|---|---:|---:|---:|---:|---:|"]
    for kernel in sorted({v["kernel"] for v in report.variants}):
        rows = [r for r in report.rows if r["kernel"] == kernel]
        out.append(f"| {kernel} | {len({r['variant_id'] for r in rows})} | "
                   f"{max(v['configs'] for v in report.variants if v['kernel'] == kernel)} | "
                   f"{sum(r['kept'] for r in rows)} | {sum(not r['kept'] for r in rows)} | "
                   f"{sum(bool(r['kept'] and r['violations']) for r in rows)} |")
    for variant in report.variants:
        rows = [r for r in report.rows if r["variant_id"] == variant["id"]]
        seen = variant["seen_in"]
        out += ["", f"### {variant['kernel'].rsplit('.', 1)[-1]}: {variant['label']}", "",
                f"Launched by {len(seen)} scenario runs, e.g. {'; '.join(seen[:3])}. "
                f"Kept: {', '.join(variant['kept']) or 'none'}.", "",
                "| config | kept | regs | stack | LDL/STL | smem KB | MMA | loads | loop | CTA/SM | verdict |",
                "|---|:-:|---:|---:|---:|---:|---|---|---:|---:|---|"]
        for r in rows:
            if r["error"]:
                out.append(f"| {r['config']} | {'yes' if r['kept'] else 'no'} | | | | | | | | | {r['error']} |")
                continue
            verdict = "; ".join(r["violations"]) or "ok"
            out.append(f"| {r['config']} | {'yes' if r['kept'] else 'no'} | {r['registers']} | {r['stack']} | "
                       f"{r['local_loads']}/{r['local_stores']} | {r['shared'] / 1024:.0f} | {_matrix_label(r)} | "
                       f"{_loads_label(r)} | {r['main_loop'] or '-'} | {r['ctas_per_sm']} | {verdict} |")
    return "\n".join(out) + "\n"
