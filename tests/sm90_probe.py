"""Compiles a few kernels for sm_90 and prints what the compile report reads from them, as JSON.

Run by tests/test_compile_report.py (``python -m tests.sm90_probe`` from the repository root) in a process without TRITON_INTERPRET (compiling needs the
real JIT, which the test session replaces with the interpreter). The toy kernels are known
cases: one that must spill, and one bf16 dot that must and one that cannot use wgmma.
"""
import json

import torch
import triton
import triton.language as tl

import vit_kernels as vk
from vit_kernels import backend
from vit_kernels.compile_report import report, sm90


@triton.jit
def _spilling(X, Y, N: tl.constexpr):
    # An N x N fp32 tile in one warp that must stay live across a row reduction: N * N / 32
    # values per thread, far past the 255 registers a thread can hold.
    offs = tl.arange(0, N)
    x = tl.load(X + offs[:, None] * N + offs[None, :])
    y = x / tl.sum(x, axis=1)[:, None]
    tl.store(Y + offs[:, None] * N + offs[None, :], tl.sqrt(y) * x)


@triton.jit
def _dot(A, B, C, N: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(A + offs[:, None] * N + offs[None, :])
    b = tl.load(B + offs[:, None] * N + offs[None, :])
    tl.store(C + offs[:, None] * N + offs[None, :], tl.dot(a, b).to(C.dtype.element_ty))


def _row(kernel, args, kwargs, config=None):
    job = sm90.specialise(kernel, args, kwargs, config)
    row = sm90.compile_job(job)
    if not row["error"]:
        row["violations"] = report.violations(row)
    return row


def _meta(*shape, dtype=torch.bfloat16, **kw):
    return torch.empty(*shape, device="meta", dtype=dtype, **kw)


def main():
    out = {}
    # The fc1 GEMM of ViT-B as the host launches it (row-major operands: through TMA descriptors),
    # with a 128x128x64 tile in 3 and 4 pipeline stages; and the same launch through pointers
    # (TMA=False), the path of operands no descriptor can read (cp.async loads).
    with vk.use_backend("triton"), backend.record_launches() as launches:
        vk.ops.linear_gelu(_meta(256 * 197, 768), _meta(3072, 768, requires_grad=True), _meta(3072))
    (fc1,) = launches
    assert fc1.kwargs["TMA"] is True, fc1.kwargs
    paths = {"": fc1.kwargs, "pointer_": dict(fc1.kwargs, TMA=False)}
    for path, kwargs in paths.items():
        for stages in (3, 4):
            config = triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=8,
                                   num_stages=stages)
            out[f"{path}stages{stages}"] = dict(row=_row(fc1.kernel, fc1.args, kwargs, config),
                                                tile_bytes=(128 + 128) * 64 * 2)
        # The same kernel with the launch's divisibility attributes dropped: what a report that
        # guessed the specialisation would have compiled.
        job = sm90.specialise(fc1.kernel, fc1.args, kwargs, config)
        out[f"{path}without_attrs"] = sm90.compile_job(sm90.Job(job.module, job.name, job.signature, job.constexprs,
                                                                (), job.options))
    x = _meta(128, 128, dtype=torch.float32)
    out["spilling"] = _row(_spilling, (x, x), dict(N=128, num_warps=1))
    a = _meta(64, 64)
    out["dot_w4"] = _row(_dot, (a, a, a), dict(N=64, num_warps=4))
    out["dot_w2"] = _row(_dot, (a, a, a), dict(N=64, num_warps=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
