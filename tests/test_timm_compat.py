"""What a timm user does with a model keeps working on vk's and on optimized timm models.

Adapted from timm's tests/test_models.py (forward_intermediates, default cfgs, features, FX) and
extended to what users do around a model: torch.save/pickle, ONNX, TorchScript, hooks,
wrappers, tags and checkpoints. Every model here runs the PyTorch reference of every op (the
conversions and the fused stream are under test, not the kernels) at a depth of 2.
"""
import copy
import io
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import vit_kernels as vk
from vit_kernels.vision_transformer import MODEL_CONFIGS

timm = pytest.importorskip("timm")

NAMES = vk.list_models()


@pytest.fixture(autouse=True)
def _reference_backend():
    with vk.use_backend("torch"):
        yield


def _small(name):
    """depth 2 at a small image size (same architecture: prefix tokens, pooling, norms, widths)."""
    patch = MODEL_CONFIGS[name]["patch_size"]
    return dict(depth=2, img_size=2 * patch)


def _models(name, **overrides):
    """{"vk": vk's model, "optimized": an optimized timm model}, and the unfused timm model, all with
    the same weights, in eval mode."""
    overrides = {**_small(name), **overrides}
    ref = timm.create_model(name, **overrides).eval()
    optimized = timm.create_model(name, **overrides).eval()
    optimized.load_state_dict(ref.state_dict())
    own = vk.create_model(name, **overrides).eval()
    own.load_state_dict(ref.state_dict())
    return {"vk": own, "optimized": vk.optimize(optimized)}, ref


def _images(model, batch=2):
    return torch.randn(batch, 3, *model.patch_embed.img_size)


def _fused(model) -> bool:
    """Whether ``model`` runs the fused residual stream (vk's class, or optimize's forward)."""
    return type(model) is vk.VisionTransformer or model.vit_kernels_report.fused_stream


# --- saving, copying, tracing, exporting ------------------------------------------------------

@pytest.mark.parametrize("kind", ["vk", "optimized"])
def test_torch_save_load_pickle_and_deepcopy_keep_the_fused_model(kind):
    models, ref = _models("vit_small_patch14_dinov2")
    model, x = models[kind], _images(models[kind])
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    for loaded in copies:
        assert _fused(loaded)
        if kind == "optimized":  # the forward is bound to the copy, not to the original
            assert loaded.forward.args[0] is loaded
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def _op_targets(graph_module) -> set:
    return {node.target.__name__ for node in graph_module.graph.nodes
            if node.op == "call_function" and node.target.__module__.startswith("vit_kernels")}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["vk", "optimized"])
def test_fx_symbolic_trace_keeps_the_ops_and_matches(name, kind):
    models, ref = _models(name)
    model = models[kind]
    x = _images(model)
    # The fused ops are single nodes of the graph (so the kernels run in it), as are the image
    # checks. FX makes the forward's attn_mask a graph input, which may be a mask: attention then
    # traces as SDPA, as timm's does, unless the caller says there is none (concrete_args).
    traced = torch.fx.symbolic_trace(model)
    without_mask = torch.fx.symbolic_trace(model, concrete_args={"attn_mask": None, "is_causal": False})
    assert {"add_layer_norm", "mlp", "patch_embed", "check_images"} <= _op_targets(traced)
    assert {"add_layer_norm", "qkv_attention", "mlp", "patch_embed", "check_images"} <= _op_targets(without_mask)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), ref(x))
        torch.testing.assert_close(without_mask(x), ref(x))
    with pytest.raises(ValueError, match="channels; expected in_chans = 3"):
        traced(torch.randn(2, 4, *model.patch_embed.img_size))


@pytest.mark.parametrize("name", ["vit_base_patch16_clip_224", "vit_base_patch14_reg4_dinov2"])
@pytest.mark.parametrize("train", [False, True])
def test_timm_fx_feature_extractor(name, train):
    # timm's test_model_forward_fx: its FX feature extractor returns the last node; train mode
    # has its own graph and backward.
    from timm.models import create_feature_extractor, get_graph_node_names
    models, ref = _models(name)
    model = models["optimized"].train(train)
    ref.train(train)
    train_nodes, eval_nodes = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, return_nodes=[(train_nodes if train else eval_nodes)[-1]])
    x = _images(model)
    out, expected = list(fx_model(x).values())[0], ref(x)
    torch.testing.assert_close(out, expected)
    if train:
        out.square().mean().backward()
        expected.square().mean().backward()
        theirs = dict(ref.named_parameters())
        for pname, param in model.named_parameters():
            torch.testing.assert_close(param.grad, theirs[pname].grad, msg=lambda m: f"{pname}: {m}")


@pytest.mark.parametrize("kind", ["vk", "optimized"])
def test_torchscript_is_refused_with_what_to_do(kind):
    models, _ = _models("vit_tiny_patch16_224")
    with pytest.raises(TypeError, match="TorchScript cannot compile.*torch.compile"):
        torch.jit.script(models[kind])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the ops' shape checks, constant in a trace
def test_torchscript_after_restore_and_torch_jit_trace():
    models, ref = _models("vit_tiny_patch16_224")
    x = _images(ref)
    with torch.no_grad():
        expected = ref(x)
        traced = torch.jit.trace(models["vk"], (x,))
        torch.testing.assert_close(traced(x), expected)
        scripted = torch.jit.script(vk.restore(models["optimized"]))
        torch.testing.assert_close(scripted(x), expected)


@pytest.mark.parametrize("name", ["vit_base_patch16_clip_224", "vit_base_patch14_reg4_dinov2",
                                  "vit_base_patch16_siglip_224"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", ["vk", "optimized"])
def test_onnx_export_runs_in_onnxruntime(name, dynamo, kind, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    models, ref = _models(name)
    model = models[kind]
    x = _images(model)
    path = str(tmp_path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, tracer warnings
        torch.onnx.export(model, (x,), path, dynamo=dynamo)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), ref(x), rtol=1e-4, atol=1e-5)


def test_fullgraph_compile_as_the_first_call_in_a_fresh_process():
    script = """
import torch, vit_kernels as vk
model = vk.create_model("vit_tiny_patch16_224", depth=1, img_size=32).eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, model(x))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# --- hooks -------------------------------------------------------------------------------------

def _record_hooks(model, names):
    """Forward hooks on ``names``; returns {name: [(inputs, output), ...]} as the calls come."""
    seen = {}
    for name in names:
        def hook(module, args, output, name=name):
            seen.setdefault(name, []).append(([a.detach().clone() for a in args if torch.is_tensor(a)],
                                              output.detach().clone()))
        model.get_submodule(name).register_forward_hook(hook)
    return seen


def _assert_same_calls(seen, expected):
    assert seen.keys() == expected.keys(), sorted(seen.keys() ^ expected.keys())
    for name, calls in expected.items():
        assert len(seen[name]) == len(calls), name
        for (args, out), (ref_args, ref_out) in zip(seen[name], calls):
            torch.testing.assert_close(out, ref_out, msg=lambda m: f"{name} output: {m}")
            for a, r in zip(args, ref_args, strict=True):
                torch.testing.assert_close(a, r, msg=lambda m: f"{name} input: {m}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["vk", "optimized"])
def test_hooks_on_every_submodule_see_what_timm_passes(name, kind):
    models, ref = _models(name)
    model = models[kind]
    names = [n for n, _ in ref.named_modules() if n]
    seen, expected = _record_hooks(model, names), _record_hooks(ref, names)
    x = _images(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    _assert_same_calls(seen, expected)


def test_a_hook_on_any_one_submodule_fires_as_in_timm():
    # One hook at a time: the modules around the hooked one still fuse, and the hooked one (a
    # norm the add would run in, a q/k norm inside the attention op, the patch projection, the
    # last block's MLP on the class-token path) runs as itself on timm's tensors.
    models, ref = _models("vit_small_patch14_dinov2", qk_norm=True, global_pool="token")
    model = models["optimized"]
    x = _images(model)
    for name in [n for n, _ in ref.named_modules() if n]:
        seen, expected = _record_hooks(model, [name]), _record_hooks(ref, [name])
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x))
        _assert_same_calls(seen, expected)  # fired as often as timm's (attn_drop: never, in both)
        for m in (model.get_submodule(name), ref.get_submodule(name)):
            m._forward_hooks.clear()


def test_global_hooks_see_every_module_as_in_timm():
    models, ref = _models("vit_tiny_patch16_224")
    model, x = models["vk"], _images(models["vk"])
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: calls.append(out.detach()))
    try:
        with torch.no_grad():
            model(x)
            ours, calls[:] = list(calls), []
            ref(x)
    finally:
        handle.remove()
    assert len(ours) == len(calls)
    for a, b in zip(ours, calls):
        torch.testing.assert_close(a, b)


# --- forward_intermediates, features_only -------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["vk", "optimized"])
def test_forward_intermediates(name, kind):
    # timm's test_model_forward_intermediates: the features equal forward_features' (here bit for
    # bit: the same computation), and every intermediate matches timm's.
    models, ref = _models(name, depth=3)
    model = models[kind]
    x = _images(model)
    with torch.no_grad():
        features, intermediates = model.forward_intermediates(x)
        assert torch.equal(features, model.forward_features(x))
        ref_features, ref_intermediates = ref.forward_intermediates(x)
        torch.testing.assert_close(features, ref_features)
        for a, b in zip(intermediates, ref_intermediates, strict=True):
            torch.testing.assert_close(a, b)
        for kwargs in (dict(indices=[0, -1], norm=True, output_fmt="NLC", return_prefix_tokens=True),
                       dict(indices=1, stop_early=True, output_dict=True, return_prefix_tokens=True)):
            torch.testing.assert_close(model.forward_intermediates(x, **kwargs), ref.forward_intermediates(x, **kwargs))


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch14_reg4_dinov2",
                                  "vit_medium_patch16_reg4_gap_256"])
def test_features_only(name):
    kwargs = dict(_small(name), depth=4)
    ref = timm.create_model(name, features_only=True, **kwargs).eval()
    model = vk.create_model(name, features_only=True, **kwargs).eval()
    assert model.state_dict().keys() == ref.state_dict().keys()
    model.load_state_dict(ref.state_dict())
    assert list(model.out_indices) == list(ref.out_indices)
    for accessor in ("channels", "reduction", "module_name"):
        assert getattr(model.feature_info, accessor)() == getattr(ref.feature_info, accessor)()
        assert getattr(model.feature_info, accessor)(0) == getattr(ref.feature_info, accessor)(0)
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        expected = ref(x)
        for a, b in zip(model(x), expected, strict=True):
            torch.testing.assert_close(a, b)
        vk.optimize(ref)  # timm's FeatureGetterNet: optimize converts the ViT inside
        assert ref.model.vit_kernels_report.fused_stream
        for a, b in zip(ref(x), expected, strict=True):
            torch.testing.assert_close(a, b)


# --- wrappers ---------------------------------------------------------------------------------

def test_optimize_sees_through_compile_and_data_parallel():
    for wrap in (lambda m: torch.compile(m, backend="eager"), nn.DataParallel):
        models, ref = _models("vit_tiny_patch16_224")
        plain = timm.create_model("vit_tiny_patch16_224", **_small("vit_tiny_patch16_224")).eval()
        plain.load_state_dict(ref.state_dict())
        wrapped = wrap(plain)
        x = _images(ref)
        with torch.no_grad():
            wrapped(x)  # a compiled model that has already run recompiles after optimize
            assert vk.optimize(wrapped) is wrapped
            assert plain.vit_kernels_report.fused_stream
            torch.testing.assert_close(wrapped(x), ref(x))
        assert vk.restore(wrapped) is wrapped and "forward" not in plain.__dict__
        torch._dynamo.reset()


def test_optimize_warns_when_it_swaps_nothing():
    model = timm.create_model("vit_tiny_patch16_224", **_small("vit_tiny_patch16_224"))
    with pytest.warns(RuntimeWarning, match="nothing was swapped"):
        vk.optimize(model, attention=False, mlp=False, norm=False, patch_embed=False)


def test_optimize_names_what_it_cannot_see_through():
    with pytest.raises(TypeError, match="OptimizedModule, DistributedDataParallel"):
        vk.optimize(nn.Sequential(nn.Linear(2, 2)))


# --- configs, tags, checkpoints ------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_default_cfg(name):
    # timm's test_model_default_cfgs: the cfg describes the model, its classifier and first conv
    # are parameters, a forward at its input size gives num_features after reset_classifier(0).
    model = vk.create_model(name, depth=1)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    expected = timm.create_model(name, depth=1).pretrained_cfg
    assert {k: cfg[k] for k in cfg} == {k: expected.get(k) for k in cfg}
    state = model.state_dict()
    if cfg["num_classes"]:
        assert cfg["classifier"] + ".weight" in state
    assert cfg["first_conv"] + ".weight" in state
    assert tuple(cfg["input_size"][1:]) == model.patch_embed.img_size
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(torch.randn(1, *cfg["input_size"])).shape == (1, model.num_features)


def test_name_with_a_pretrained_tag():
    model = vk.create_model("vit_base_patch16_224.augreg_in21k", depth=1)
    ref = timm.create_model("vit_base_patch16_224.augreg_in21k", depth=1)
    assert model.num_classes == ref.num_classes == 21843
    assert model.pretrained_cfg["tag"] == "augreg_in21k"
    default = vk.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k", depth=1)
    assert default.pretrained_cfg == vk.create_model("vit_base_patch16_224", depth=1).pretrained_cfg
    assert vk.create_model("vit_base_patch16_224.augreg_in21k", depth=1, num_classes=7).num_classes == 7
    with pytest.raises(KeyError, match="no pretrained tag 'nope'"):
        vk.create_model("vit_base_patch16_224.nope")
    with pytest.raises(KeyError, match="unknown model_name"):
        vk.create_model("vit_base_patch15_224.augreg_in21k")


def test_checkpoint_with_another_num_classes_loads_all_but_the_head(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", **_small("vit_tiny_patch16_224"))
    path = tmp_path / "weights.pth"
    torch.save(ref.state_dict(), path)
    for num_classes in (10, 0):
        with pytest.warns(UserWarning, match="head.weight"):
            model = vk.create_model("vit_tiny_patch16_224", checkpoint_path=str(path), num_classes=num_classes,
                                    **_small("vit_tiny_patch16_224"))
        theirs = ref.state_dict()
        for key, value in model.state_dict().items():
            if not key.startswith("head."):
                assert torch.equal(value, theirs[key]), key
        assert model.num_classes == num_classes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a head that fits loads, silently
        model = vk.create_model("vit_tiny_patch16_224", checkpoint_path=str(path), num_classes=1000,
                                **_small("vit_tiny_patch16_224"))
    assert torch.equal(model.head.weight, ref.head.weight)


# --- the package ---------------------------------------------------------------------------------

def test_version_and_info():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "vit_kernels", *args], capture_output=True, text=True,
                              timeout=120, check=True).stdout
    assert run("--version").strip() == f"vit_kernels {vk.__version__}"
    first = run("info").splitlines()[0]
    assert first.startswith(f"vit_kernels {vk.__version__} (commit ")
