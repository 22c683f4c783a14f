"""DDP and FSDP2 over an optimized model: 2 gloo CPU processes against one unfused timm model.

Each rank trains a model that ``vk.optimize`` converted (inside DDP; before FSDP2, which it
refuses to convert once sharded), on its own half of
every batch; the reference is one process training the plain timm model on the whole batch. A
mean loss per rank and the wrappers' gradient averaging make the two the same sums in another
order: after every step the loss, every gradient and every parameter must agree at float32's
default tolerances (the worst gradient error measured was 0.21 of it, the worst parameter error
0.03). Reference backend: this tests the conversion under the wrappers, not the kernels.
"""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import vit_kernels as vk
from vit_kernels.layers import Block

timm = pytest.importorskip("timm")

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    try:
        from torch.distributed._composable.fsdp import fully_shard
    except ImportError:
        fully_shard = None

NAME = "vit_small_patch16_224"
# Patch 8 at 32 px: 16 patches + a class token through both blocks, a few seconds a run.
OVERRIDES = dict(depth=2, img_size=32, patch_size=8, num_classes=10)
WORLD = 2
BATCH = 2  # per rank
STEPS = 3
# Seconds for a whole spawn (the gloo collectives time out after the same): a hang fails the test.
# Generous: a run takes about 6 s, up to 41 s seen on 2 cores busy with other tests.
TIMEOUT = 300


def _full(tensor):
    """The whole tensor: an FSDP2 DTensor gathered from every rank (a collective), else itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _train(model, module, images, labels):
    """Per step: the loss, then every gradient and every parameter (gathered) after ``step()``.

    ``model`` is what runs (a wrapper or the module), ``module`` is what names the parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trace = []
    for x, y in zip(images, labels):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trace.append(dict(
            loss=loss.detach(),
            grads={n: _full(p.grad).detach().clone() for n, p in module.named_parameters()},
            params={n: _full(p.detach()).clone() for n, p in module.named_parameters()}))
    return trace


def _create(source):
    return (timm.create_model if source == "timm" else vk.create_model)(NAME, **OVERRIDES)


def _count_block_calls(model):
    """{"fused": calls of Block.forward_fused, "alone": calls of Block.forward}, counted as they run.
    ``forward`` runs a block as itself through ``forward_fused``; the other fused calls are run_blocks'
    residual stream across blocks. Instance attributes, not hooks: a hook would make run_blocks fall
    back to running the block alone."""
    calls = dict(fused=0, alone=0)

    def counted(kind, forward):
        def call(*args, **kwargs):
            calls[kind] += 1
            return forward(*args, **kwargs)
        return call

    for block in model.blocks:
        block.forward_fused = counted("fused", block.forward_fused)
        block.forward = counted("alone", block.forward)
    return calls


def _worker(rank, source, wrapper, inputs_path, out_dir):
    torch.set_num_threads(1)  # two ranks on two cores
    # A file rendezvous, not a TCP port picked in advance: nothing another test can take meanwhile.
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "rendezvous"),
                            rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT))
    try:
        inputs = torch.load(inputs_path)
        model = _create(source)
        model.load_state_dict(inputs["state"])
        with vk.use_backend("torch"):
            if wrapper == "ddp":  # optimize sees through DDP: it converts the model DDP calls
                wrapped = vk.optimize(torch.nn.parallel.DistributedDataParallel(model))
            else:
                vk.optimize(model)
            assert model.vit_kernels_report.fused_stream and all(type(b) is Block for b in model.blocks)
            calls = _count_block_calls(model)
            if wrapper != "ddp":
                if wrapper == "fsdp2":
                    for block in model.blocks:
                        fully_shard(block)
                wrapped = fully_shard(model)
                with pytest.raises(RuntimeError, match="before fully_shard"):
                    vk.optimize(wrapped)  # FSDP owns the parameters of the modules it would swap
            trace = _train(wrapped, model, inputs["images"].chunk(WORLD, dim=1)[rank],
                           inputs["labels"].chunk(WORLD, dim=1)[rank])
        torch.save(dict(trace=trace, calls=calls), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(*args):
    """Run _worker on WORLD ranks; a worker's exception fails the test with its traceback."""
    context = mp.start_processes(_worker, args=args, nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):  # raises on a failure
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail(f"the {WORLD} workers still ran after {TIMEOUT} s")


def _assert_close(actual, expected, what):
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, msg=lambda m: f"{what} {name}: {m}")


# How each block runs under each wrapper. DDP adds no module hooks: the residual stream stays fused
# across blocks. FSDP2 with a group per block puts hooks on every block (they unshard its
# parameters): each block runs as itself and fires them. FSDP2 with one group at the root leaves
# the blocks hook-free: the fused stream runs on the parameters the root's hook unsharded.
BLOCK_CALLS = {"ddp": dict(fused=STEPS * OVERRIDES["depth"], alone=0),
               "fsdp2": dict(fused=STEPS * OVERRIDES["depth"], alone=STEPS * OVERRIDES["depth"]),
               "fsdp2_root": dict(fused=STEPS * OVERRIDES["depth"], alone=0)}


@pytest.mark.parametrize("source", ["timm", "vk"])
@pytest.mark.parametrize("wrapper", list(BLOCK_CALLS))
def test_matches_single_process(wrapper, source, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    if wrapper.startswith("fsdp2") and fully_shard is None:
        pytest.skip("this torch has no fully_shard (FSDP2)")

    ref = timm.create_model(NAME, **OVERRIDES)
    images = torch.randn(STEPS, WORLD * BATCH, 3, *ref.patch_embed.img_size)
    labels = torch.randint(0, OVERRIDES["num_classes"], (STEPS, WORLD * BATCH))
    torch.save(dict(state=ref.state_dict(), images=images, labels=labels), tmp_path / "inputs.pt")

    _spawn(source, wrapper, str(tmp_path / "inputs.pt"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    expected = _train(ref, ref, images, labels)

    assert [r["calls"] for r in ranks] == [BLOCK_CALLS[wrapper]] * WORLD
    for step, (want, *got) in enumerate(zip(expected, *(r["trace"] for r in ranks))):
        torch.testing.assert_close(sum(g["loss"] for g in got) / WORLD, want["loss"],
                                   msg=lambda m: f"step {step} loss: {m}")
        for rank, g in enumerate(got):
            _assert_close(g["grads"], want["grads"], f"step {step} rank {rank} gradient")
            _assert_close(g["params"], want["params"], f"step {step} rank {rank} parameter")
        if wrapper == "ddp":  # every rank holds the same all-reduced gradients
            for name, grad in got[0]["grads"].items():
                assert torch.equal(grad, got[1]["grads"][name]), f"step {step} {name}: ranks differ"
