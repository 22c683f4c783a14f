"""The C++/CUDA patch-embed extension against the PyTorch reference.

CI builds the extension (.ci/build_extension.sh), so every test here that needs it fails,
not skips, when it did not load.
"""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vit_kernels as vk
from vit_kernels import _extension, reference
from vit_kernels.ops import _patch_embed as pe
from tests.utils import MIN_SAMPLES, PATCH_EMBED, Sample, check, opcheck


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NAMES = ("images", "weight", "bias", "pos_embed", "prefix_tokens", "mean", "std")


@pytest.fixture(scope="module", autouse=True)
def extension():
    assert pe._extension_ready(), f"the extension did not load: {_extension.status()[1]}"


def make_case(*, patch=16, size=(32, 48), img_dtype=torch.uint8, prefix=1, pos="all", bias=True, norm=True,
              channels_last=False, B=2, C=3, D=40, device="cpu"):
    """Random inputs in float32 (images uint8 or float32). D = 40: a width that is no power of two."""
    H, W = size
    if img_dtype == torch.uint8:
        images = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8)
    else:
        images = torch.rand(B, C, H, W).to(img_dtype)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    L = -(-H // patch) * -(-W // patch)
    case = dict(images=images, weight=torch.randn(D, C, patch, patch) * (C * patch * patch) ** -0.5,
                bias=torch.randn(D) if bias else None,
                pos_embed={"all": torch.randn(1, prefix + L, D), "patches": torch.randn(1, L, D), None: None}[pos],
                prefix_tokens=torch.randn(1, prefix, D) if prefix else None,
                mean=torch.tensor(IMAGENET_MEAN[:C] * (C // 3 + 1))[:C] if norm else None,
                std=torch.tensor(IMAGENET_STD[:C] * (C // 3 + 1))[:C] if norm else None)
    return {k: None if v is None else v.to(device) for k, v in case.items()}


def leaves(case, dtype, grad=True):
    """Copies of ``case`` with the float tensors in ``dtype`` (layout kept), requiring grad.

    mean and std get one gradient element per channel, too few for the numerics rule with 3
    channels: they require grad only with MIN_SAMPLES channels or more (test_normalisation_gradients).
    """
    out = {}
    for k, v in case.items():
        if v is not None and v.is_floating_point():
            v = v.detach().to(dtype).requires_grad_(grad and (k not in ("mean", "std") or v.numel() >= MIN_SAMPLES))
        out[k] = v
    return out


def grads_of(out, case, cotangent):
    names = [k for k, v in case.items() if v is not None and v.requires_grad]
    return dict(zip(names, torch.autograd.grad(out, [case[k] for k in names], cotangent)))


def check_against_reference(case, pad=False, dtype=torch.float32):
    """Forward and every gradient: extension in ``dtype`` vs PyTorch in ``dtype``, both vs float64."""
    [ours] = check(PATCH_EMBED, Sample(leaves(case, dtype), dict(pad=pad)))
    assert ours["out"].dtype == dtype


def check_op(case, pad=False):
    """torch.library.opcheck of the C++ op as vk.ops.patch_embed calls it on ``case``."""
    checked = opcheck(PATCH_EMBED, Sample(case, dict(pad=pad)))
    assert checked == ["vit_kernels.patch_embed.default"], checked


# (patch, image size): ViT-S/14 and ViT-B/16 and /32 patches on small grids; non-square grids
# catch a swapped row/column index, a grid of one patch row catches an off-by-one in y.
PATCH_SIZES = [(14, (28, 42)), (16, (32, 48)), (16, (16, 64)), (32, (64, 64))]


# No bias: timm's pre_norm models. Bias and normalisation are independent terms; varying them
# together keeps the file within its CI time.
@pytest.mark.parametrize("bias,norm", [(True, True), (False, False)])
@pytest.mark.parametrize("prefix,pos", [
    (0, None), (0, "all"),            # a plain PatchEmbed; pos_embed on the patches only
    (1, "all"), (1, "patches"),       # class token; timm's default and no_embed_class
    (5, "all"), (5, None)])           # class + 4 registers (DINOv2-reg); prefix with no pos_embed
@pytest.mark.parametrize("img_dtype,channels_last", [
    (torch.uint8, False), (torch.uint8, True), (torch.float32, False), (torch.float32, True)])
@pytest.mark.parametrize("patch,size", PATCH_SIZES)
def test_matches_reference(patch, size, img_dtype, channels_last, prefix, pos, bias, norm):
    case = make_case(patch=patch, size=size, img_dtype=img_dtype, channels_last=channels_last, prefix=prefix,
                     pos=pos, bias=bias, norm=norm)
    check_against_reference(case)


# timm's dynamic_img_pad: 30 x 45 with patch 16 pads to 32 x 48 (a partial last row and column);
# 17 x 16 adds a row of patches that holds one image line.
@pytest.mark.parametrize("img_dtype,channels_last", [(torch.uint8, False), (torch.float32, True)])
@pytest.mark.parametrize("size", [(30, 45), (17, 16), (32, 48)])
def test_padding(size, img_dtype, channels_last):
    case = make_case(size=size, img_dtype=img_dtype, channels_last=channels_last, prefix=1, pos="all")
    check_against_reference(case, pad=True)


def test_padding_is_zero_after_normalisation():
    # A 1 x 1 image padded to one 16 x 16 patch: only pixel (0, 0) reaches the projection, as
    # (v / 255 - mean) / std; padded pixels add nothing (padding the raw image would add -mean / std).
    images = torch.randint(0, 256, (1, 3, 1, 1), dtype=torch.uint8)
    weight, mean, std = torch.randn(4, 3, 16, 16), torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    out = vk.ops.patch_embed(images, weight, mean=mean, std=std, pad=True)
    pixel = (images.reshape(3) / 255 - mean) / std
    torch.testing.assert_close(out, (weight[:, :, 0, 0] @ pixel).reshape(1, 1, 4))


# The gradients of mean and std: sums over the batch and the image per channel, judged over
# MIN_SAMPLES channels; uint8 and float images, channels-last, and padding (padded pixels are
# zero after normalisation and must add nothing).
@pytest.mark.parametrize("img_dtype,channels_last,size,pad", [
    (torch.uint8, False, (32, 48), False), (torch.float32, True, (32, 48), False), (torch.uint8, True, (30, 45), True)])
def test_normalisation_gradients(img_dtype, channels_last, size, pad):
    case = make_case(size=size, img_dtype=img_dtype, channels_last=channels_last, C=MIN_SAMPLES)
    assert leaves(case, torch.float32)["mean"].requires_grad
    check_against_reference(case, pad=pad)


def test_batch_of_one_and_wide():
    # B = 1 and D = 1000 (a width that is no multiple of a GEMM tile), 3 x 3 patch grid.
    check_against_reference(make_case(B=1, D=1000, size=(48, 48), prefix=1, pos="all", img_dtype=torch.float32))


def test_half_precision_weights():
    # bf16/fp16 weights on the CPU (the model under autocast-free half precision); float32 images.
    for dtype in (torch.bfloat16, torch.float16):
        check_against_reference(make_case(img_dtype=torch.float32, prefix=1, pos="all"), dtype=dtype)


def test_float64_gradcheck():
    # Every input that can take a gradient, mean and std included; 7 x 6 pads to the same 2 x 2 grid.
    case = leaves(make_case(patch=4, size=(8, 8), img_dtype=torch.float32, C=2, D=3, prefix=2, pos="all"),
                  torch.float64)
    for pad, (H, W) in ((False, (8, 8)), (True, (7, 6))):
        inputs = dict(case, images=case["images"][..., :H, :W].detach().requires_grad_())
        assert torch.autograd.gradcheck(lambda *a: torch.ops.vit_kernels.patch_embed(*a, pad),
                                        tuple(inputs[k] for k in NAMES))


OPCHECK_CASES = {  # name: make_case's arguments, pad
    "uint8, everything": (dict(), False),
    "float, channels-last, no_embed_class": (dict(img_dtype=torch.float32, channels_last=True, pos="patches"), False),
    "plain": (dict(prefix=0, pos=None, bias=False, norm=False, img_dtype=torch.float32), False),
    "padded": (dict(size=(30, 45), img_dtype=torch.float32), True),
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck(name):
    kwargs, pad = OPCHECK_CASES[name]
    check_op(leaves(make_case(**kwargs), torch.float32), pad)


def test_torch_compile_fullgraph():
    case = make_case(img_dtype=torch.uint8, prefix=1, pos="all")
    compiled = torch.compile(vk.ops.patch_embed, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**case), vk.ops.patch_embed(**case))


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatches_to_the_extension(monkeypatch):
    assert vk.ops.implementation("patch_embed", "cpu")[0] == "extension"
    monkeypatch.setattr(pe, "_reference", lambda *a: pytest.fail("the reference ran instead of the extension"))
    case = make_case()
    with _OpLog() as log:
        vk.ops.patch_embed(**case)
    # One call of the C++ op and nothing else: no conv, cat or add passes from Python.
    assert log.ops == ["vit_kernels.patch_embed.default"], log.ops
    assert torch._C._dispatch_has_kernel_for_dispatch_key("vit_kernels::patch_embed", "CPU")


def test_backend_torch_runs_the_reference():
    case = make_case()
    with vk.use_backend("torch"), _OpLog() as log:
        assert vk.ops.implementation("patch_embed", "cpu")[0] == "torch"
        out = vk.ops.patch_embed(**case)
    assert "vit_kernels.patch_embed.default" not in log.ops and "aten.convolution.default" in log.ops, log.ops
    torch.testing.assert_close(out, reference.patch_embed(**case))


@pytest.mark.parametrize("how", ["build fails", "disabled"])
def test_failed_build_falls_back_with_one_warning(monkeypatch, how):
    def failing_build():
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_load_library", failing_build)
    monkeypatch.setattr(pe, "_extension_for", {})
    if how == "disabled":
        monkeypatch.setenv(_extension.ENV_VAR, "0")
    case = make_case()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = vk.ops.patch_embed(**case)
        vk.ops.patch_embed(**case)
    torch.testing.assert_close(out, reference.patch_embed(**case))
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    name, why = vk.ops.implementation("patch_embed", "cpu")
    assert name == "torch"
    if how == "disabled":
        assert not runtime and "VIT_KERNELS_EXTENSION=0" in why
    else:
        assert len(runtime) == 1 and "c++: command not found" in str(runtime[0].message)
        assert _extension.status() == (False, "RuntimeError: c++: command not found")


def test_missing_device_kernel_falls_back_with_one_warning(monkeypatch):
    # A CPU-only build (no nvcc at JIT time) meeting CUDA tensors: simulated with the "meta" device.
    monkeypatch.setattr(pe, "_extension_for", {})
    case = {k: None if v is None else v.to("meta") for k, v in make_case().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert vk.ops.patch_embed(**case).shape == (2, 7, 40)
    assert len([w for w in caught if "has no meta kernel" in str(w.message)]) == 1
    assert vk.ops.implementation("patch_embed", "meta")[0] == "torch"


def test_library_fragment_coexists_with_python_ops():
    # The Triton ops register Python fragments in the same namespace: after the extension ...
    @torch.library.custom_op("vit_kernels::_test_after_extension", mutates_args=())
    def after(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    assert torch.equal(torch.ops.vit_kernels._test_after_extension(torch.ones(2)), torch.full((2,), 2.0))
    assert vk.ops.patch_embed(**make_case()).shape == (2, 1 + 6, 40)
    # ... and before it, in a fresh process (the extension is cached by now, so this is quick).
    script = textwrap.dedent("""
        import torch
        @torch.library.custom_op("vit_kernels::_test_before_extension", mutates_args=())
        def before(x: torch.Tensor) -> torch.Tensor:
            return x * 2
        from vit_kernels import _extension
        assert _extension.load(), _extension.status()
        import vit_kernels as vk
        out = vk.ops.patch_embed(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8), torch.randn(2, 3, 16, 16))
        assert out.shape == (1, 1, 2)
        assert torch.equal(torch.ops.vit_kernels._test_before_extension(torch.ones(1)), torch.full((1,), 2.0))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_unwritten_outputs_show():
    # The C++ side allocates with at::empty, which the Python poisoning cannot reach. The CPU
    # allocator (glibc) hands a just-freed block of the same size straight back, so NaN-filled
    # blocks freed right before the call stand in for poisoned allocations.
    case = make_case(prefix=5, pos="all", size=(30, 45))
    B, (D, C, p, _) = 2, case["weight"].shape
    T = 5 + 2 * 3
    sizes = [(B * T, C * p * p), (B, T, D), (T, D)]
    blocks = [torch.full(s, float("nan")) for s in sizes]
    pointers = {b.data_ptr() for b in blocks}
    del blocks
    reused = [torch.empty(s) for s in sizes]
    if not pointers & {r.data_ptr() for r in reused}:
        pytest.skip("the CPU allocator did not hand freed blocks back")
    for r in reused:
        r.fill_(float("nan"))
    del reused
    out = vk.ops.patch_embed(**case, pad=True)
    assert not torch.isnan(out).any()


def _bad_inputs():
    ok = make_case(prefix=1, pos="all")
    yield "images 3-d", dict(ok, images=ok["images"][0]), "images must have shape \\(B, C, H, W\\)"
    yield "images int32", dict(ok, images=ok["images"].int()), "images must be uint8, float16, bfloat16, float32"
    yield ("C != in_chans", dict(ok, images=torch.cat([ok["images"]] * 2, 1)),
           "images have 6 channels; expected in_chans = 3")
    yield "weight 2-d", dict(ok, weight=ok["weight"].flatten(1)), "weight must have shape \\(D, C, ph, pw\\)"
    yield "weight int", dict(ok, weight=ok["weight"].int()), "weight must be float16, bfloat16, float32"
    yield ("H not divisible", dict(ok, images=ok["images"][:, :, :30]),
           "image size \\(30, 48\\) must be divisible by the patch size \\(16, 16\\)")
    yield "W not divisible", dict(ok, images=ok["images"][..., :40]), "image size \\(32, 40\\) must be divisible"
    yield "bias (D+1,)", dict(ok, bias=torch.randn(41)), "bias must have shape \\(D,\\) = \\(40,\\)"
    yield "bias float64", dict(ok, bias=ok["bias"].double()), "bias must have the weight's dtype"
    yield ("prefix (P, D)", dict(ok, prefix_tokens=ok["prefix_tokens"][0]),
           "prefix_tokens must have shape \\(1, P, D = 40\\)")
    yield ("pos_embed too long", dict(ok, pos_embed=torch.randn(1, 8, 40)),
           "pos_embed must have shape \\(1, P \\+ L, D\\) = \\(1, 7, 40\\) or \\(1, L, D\\) = \\(1, 6, 40\\)")
    yield "pos_embed width", dict(ok, pos_embed=torch.randn(1, 7, 41)), "pos_embed must have shape"
    yield "mean 4 channels", dict(ok, mean=torch.rand(4)), "mean must have C = 3 elements"
    yield "std 2 channels", dict(ok, std=torch.rand(2)), "std must have C = 3 elements"
    yield "std int", dict(ok, std=torch.ones(3, dtype=torch.int64)), "std must be a floating-point tensor"
    yield "mean without std", dict(ok, std=None), "mean and std must be given together"


BAD_INPUTS = list(_bad_inputs())


@pytest.mark.parametrize("case,match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("entry", ["python", "c++"])
def test_bad_input(entry, case, match):
    if entry == "python":
        call = lambda: vk.ops.patch_embed(**case)  # noqa: E731
    else:  # the C++ checks guard direct calls of the op
        call = lambda: torch.ops.vit_kernels.patch_embed(*(case[k] for k in NAMES))  # noqa: E731
    with pytest.raises(ValueError, match=match):
        call()


def test_pad_accepts_any_size_and_rejects_nothing_else():
    # pad=True lifts only the divisibility check.
    case = make_case(size=(30, 40), prefix=1, pos=None)
    assert vk.ops.patch_embed(**case, pad=True).shape == (2, 1 + 2 * 3, 40)
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        vk.ops.patch_embed(**dict(case, pos_embed=torch.randn(1, 5, 40)), pad=True)


# ---- CUDA: the same checks on the GPU kernel, plus half precision -------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("img_dtype,channels_last", [(torch.uint8, False), (torch.uint8, True),
                                                     (torch.float32, False), (torch.float32, True)])
@pytest.mark.parametrize("patch,size,pad", [(14, (28, 42), False), (16, (32, 48), False), (32, (64, 64), False),
                                            (16, (30, 45), True)])
@pytest.mark.parametrize("prefix,pos", [(0, None), (1, "all"), (5, "patches")])
def test_cuda_matches_reference(dtype, img_dtype, channels_last, patch, size, pad, prefix, pos):
    """Float images run in ``dtype`` (bf16 images with bf16 weights, ...)."""
    assert vk.ops.implementation("patch_embed", "cuda")[0] == "extension", vk.ops.implementation("patch_embed", "cuda")
    case = make_case(patch=patch, size=size, img_dtype=img_dtype, channels_last=channels_last, prefix=prefix,
                     pos=pos, device="cuda")
    check_against_reference(case, pad=pad, dtype=dtype)


@pytest.mark.cuda
def test_cuda_opcheck_and_large_batch():
    check_op(leaves(make_case(device="cuda", img_dtype=torch.float32), torch.float32))
    # ViT-B/16 on a batch of 256 uint8 images: 50,432 rows, K = 768.
    big = make_case(B=256, size=(224, 224), D=768, device="cuda")
    big = {k: None if v is None else v.to(torch.bfloat16) if v.is_floating_point() and k not in ("mean", "std")
           else v for k, v in big.items()}
    with vk.use_backend("torch"):
        expected = vk.ops.patch_embed(**leaves(big, torch.float32, grad=False))
    torch.testing.assert_close(vk.ops.patch_embed(**big).float(), expected, atol=5e-2, rtol=2e-2)


# ---- Edge sizes and argument forms (issue #13): both implementations --------------------------

# "extension": the default dispatch (the C++ op on the CPU); "torch": the reference.
IMPLEMENTATIONS = ["extension", "torch"]


def run_with(implementation, **case):
    with vk.use_backend("torch" if implementation == "torch" else "auto"):
        return vk.ops.patch_embed(**case)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("pad", [False, True])
def test_empty_batch_forward_and_backward(implementation, pad):
    # B = 0 (a filtered batch with nothing left): empty tokens, and every gradient zero and of its
    # input's shape. C = MIN_SAMPLES so mean and std take gradients too; 30 x 45 pads to 2 x 3 patches.
    case = leaves(make_case(B=0, C=MIN_SAMPLES, size=(30, 45) if pad else (32, 48), img_dtype=torch.float32,
                            prefix=1, pos="all"), torch.float32)
    out = run_with(implementation, **case, pad=pad)
    assert out.shape == (0, 1 + 6, 40)
    grads = grads_of(out, case, torch.ones_like(out))
    assert grads.keys() == {"images", "weight", "bias", "pos_embed", "prefix_tokens", "mean", "std"}
    for name, grad in grads.items():
        assert grad.shape == case[name].shape and not grad.any(), name
    if implementation == "extension":
        check_op(case, pad)


@pytest.mark.parametrize("shape", [(40, 3, 0, 0), (40, 3, 16, 0), (40, 3, 0, 16), (0, 3, 16, 16)])
@pytest.mark.parametrize("entry", ["extension", "torch", "c++"])
def test_empty_patch_is_a_value_error(entry, shape):
    # A 0 x 0 patch has no patch grid (it used to raise ZeroDivisionError in Python); D = 0 is
    # refused with it, as the C++ check always did.
    case = dict(make_case(prefix=0, pos=None, bias=False), weight=torch.randn(shape))
    match = "weight must have shape \\(D, C, ph, pw\\) with D, ph, pw > 0"
    with pytest.raises(ValueError, match=match):
        if entry == "c++":
            torch.ops.vit_kernels.patch_embed(*(case[k] for k in NAMES))
        else:
            run_with(entry, **case)


def zero_channel_case(**kwargs):
    """make_case with C = 0: images (2, 0, H, W), weight (40, 0, 16, 16), mean and std of 0 elements."""
    case = make_case(img_dtype=torch.float32, **kwargs)
    return dict(case, **{k: case[k][:0] for k in ("mean", "std")},
                images=case["images"][:, :0], weight=case["weight"][:, :0])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("pad,prefix,pos", [(False, 1, "all"), (True, 5, "patches"), (False, 0, None)])
def test_zero_channels_project_to_the_added_terms(implementation, pad, prefix, pos):
    # C = 0: the projection of no pixels is 0, so the tokens are prefix tokens + bias + pos_embed.
    # F.conv2d returns 0 output channels for 0 input channels; the reference must not follow it.
    case = leaves(zero_channel_case(size=(30, 45) if pad else (32, 48), prefix=prefix, pos=pos), torch.float32)
    out = run_with(implementation, **case, pad=pad)
    rows = [case["prefix_tokens"][0]] if prefix else []
    expected = torch.cat(rows + [case["bias"].expand(6, 40)])
    if pos is not None:
        expected[expected.shape[0] - case["pos_embed"].shape[1]:] += case["pos_embed"][0]
    torch.testing.assert_close(out, expected.expand(2, -1, -1))
    cotangent = torch.randn_like(out)
    grads = grads_of(out, case, cotangent)
    assert grads["images"].shape == case["images"].shape and grads["weight"].shape == (40, 0, 16, 16)
    torch.testing.assert_close(grads["bias"], cotangent[:, prefix:].sum((0, 1)))


def test_zero_channels_both_implementations_agree():
    case = leaves(zero_channel_case(prefix=1, pos="all"), torch.float32)
    outs = [run_with(impl, **case) for impl in IMPLEMENTATIONS]
    torch.testing.assert_close(*outs)
    cotangent = torch.randn_like(outs[0])
    ext, ref = (grads_of(o, case, cotangent) for o in outs)
    assert ext.keys() == ref.keys() == {"images", "weight", "bias", "pos_embed", "prefix_tokens"}
    for name in ext:
        torch.testing.assert_close(ext[name], ref[name])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("as_", [tuple, list])
def test_mean_std_as_sequences(implementation, as_):
    # timm's IMAGENET_DEFAULT_MEAN / _STD are tuples: they mean the same as float32 tensors.
    case = make_case()
    expected = run_with(implementation, **case)
    out = run_with(implementation, **dict(case, mean=as_(IMAGENET_MEAN), std=as_(IMAGENET_STD)))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mean_std_sequences_follow_the_images_device(implementation):
    # On "meta" (a model sized without memory) a sequence becomes a meta tensor, also when
    # torch.device("meta") is the default device.
    case = {k: None if v is None else v.to("meta") for k, v in make_case().items()}
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no meta kernel")  # the reference runs there
        out = run_with(implementation, **dict(case, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    assert out.device.type == "meta" and out.shape == (2, 7, 40)


def test_mean_std_sequences_compile_fullgraph():
    case = dict(make_case(), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    expected = vk.ops.patch_embed(**case)  # eager first: it loads the extension, which dynamo cannot trace
    compiled = torch.compile(vk.ops.patch_embed, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**case), expected)


def _bad_mean_std():
    yield "mean 4 floats", dict(mean=(0.5,) * 4), "mean must have C = 3 elements"
    yield "std 2 floats", dict(std=[0.5, 0.5]), "std must have C = 3 elements"
    yield "std zero in a tuple", dict(std=(0.2, 0.0, 0.2)), "std must be non-zero in every channel"
    yield "std zero in a CPU tensor", dict(std=torch.tensor([0.2, 0.2, 0.0])), "std must be non-zero in every channel"
    yield "mean of strings", dict(mean=("r", "g", "b")), "mean must be a tensor or a sequence of floats"
    yield "std ragged", dict(std=[0.2, [0.2, 0.2]]), "std must be a tensor or a sequence of floats"


BAD_MEAN_STD = list(_bad_mean_std())


@pytest.mark.parametrize("change,match", [b[1:] for b in BAD_MEAN_STD], ids=[b[0] for b in BAD_MEAN_STD])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bad_mean_std(implementation, change, match):
    with pytest.raises(ValueError, match=match):
        run_with(implementation, **dict(make_case(), **change))


def test_zero_std_tensor_direct_op_call():
    # The C++ op reads a CPU std (C values) and refuses a zero, as the Python entry does.
    case = dict(make_case(), std=torch.tensor([0.2, 0.0, 0.2]))
    with pytest.raises(ValueError, match="std must be non-zero in every channel; channel 1 is 0"):
        torch.ops.vit_kernels.patch_embed(*(case[k] for k in NAMES))


@pytest.mark.cuda
def test_cuda_std_tensor_is_not_read():
    # Checking a CUDA std for zeros would sync the device on every call: it is not checked, and a
    # zero gives inf/nan tokens. set_sync_debug_mode("error") fails any synchronising call.
    case = dict(make_case(device="cuda"), std=torch.tensor([0.2, 0.0, 0.2], device="cuda"))
    vk.ops.patch_embed(**make_case(device="cuda"))  # loads the extension outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = vk.ops.patch_embed(**case)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not torch.isfinite(out).all()
