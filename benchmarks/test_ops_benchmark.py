"""pytest-benchmark micro-benchmarks of every op provider: ``pytest benchmarks/ --benchmark-only``.

The same table (``OP_BENCHES``) and cases as ``python -m vit_kernels bench --quick`` (one ViT shape
per op); every provider is checked against the float64 reference before it is timed. Not part of
the CI test run.
"""
import pytest
import torch

from vit_kernels.bench.case import TOLERANCE, relative_error
from vit_kernels.bench.ops import OP_BENCHES, QUICK_OP_MODES, op_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _params():
    for op in OP_BENCHES:
        for case in op_cases(op, DEVICE, DTYPE, QUICK_OP_MODES, quick=True, compile_=False):
            for provider in case.providers:
                yield pytest.param(case, provider, id=f"{op}-{case.mode}-{provider}")


@pytest.mark.parametrize("case, provider", list(_params()))
def test_op(benchmark, case, provider):
    input_set = case.make_inputs()
    call = case.providers[provider](input_set)
    reference = case.provider_reference.get(provider, case.reference)
    try:
        got = call()
    except RuntimeError as error:
        pytest.skip(f"{provider} does not run here: {str(error).splitlines()[0]}")
    # 2x the baseline's error, as the harness does; the formula is in the benchmark's extra info.
    baseline = relative_error(case.providers[case.baseline](input_set)(), case.reference(input_set))
    assert relative_error(got, reference(input_set)) <= max(2 * baseline, TOLERANCE[case.dtype])
    benchmark.extra_info.update(shape=case.shape, dtype=str(case.dtype), flops=case.flops, bytes=case.bytes,
                                formula=case.formula)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        call()
        sync()
    benchmark(run)
