"""The CUDA paths of pre-training (issue 17): bf16 autocast, channels_last, shuffle-BN, SyncBN, a
1-rank NCCL group, pinned-memory transfer, and one pre-training epoch with checkpoint, resume and
export.

Marked `cuda` (`pytest -m cuda`; `python -m benchmarks.gpu_check` runs them): they skip, saying
why, where `torch.cuda.is_available()` is false. With `D3SSL_CPU_SMOKE=1` the same tests run on
the CPU instead (device "cpu", tiny sizes, gloo for NCCL), so the code cannot rot where no GPU is
(`tests/test_gpu_check.py` runs them so, through the script). Parts that exist only on CUDA (the
SyncBN kernels, pinned memory) are skipped inside a test on the CPU, never faked.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
import torchvision

from pipeline import shardset
from train import dist
from train.methods import DEFAULTS, METHODS, build, prepare
from train.model import RegionEncoder, SplitBatchNorm2d, bn_segments, chunk_sizes
from train.shuffle_bn import shuffled_forward
from train.stream import LoaderConfig, make_stream
from train.trainer import cpu_bf16, use_sync_batchnorm
from train.views import ViewConfig

from tests.train.test_pretrain import write_params as tiny_params
from tests.cuda_smoke import DEVICE, SMOKE, device  # noqa: F401 (the device fixture)
STEPS = 8 if SMOKE else 20            # optimiser steps of the loss-falls test
BATCH = 4 if SMOKE else 8

pytestmark = pytest.mark.cuda



@pytest.fixture
def one_rank_group(device, tmp_path):
    """A 1-rank process group, NCCL on CUDA (gloo on the CPU), destroyed afterwards."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield backend
    finally:
        torch_dist.destroy_process_group()


def autocast(device: torch.device, force: bool = False):
    """bf16 autocast as train.pretrain runs it with the default `bf16_cpu: auto`: always on CUDA, on
    the CPU only where oneDNN has a native bf16 path (train.trainer.cpu_bf16("auto")). On an AVX2-only CPU
    bf16 is emulated 24-36x slower, and the CPU smoke's training loops ran past their time limits in
    `benchmarks.gpu_check --cpu-smoke`; there they run in float32, as pre-training would. `force`:
    bf16 on any CPU, for a test of the bf16 dtypes themselves (one forward)."""
    enabled = device.type == "cuda" or force or cpu_bf16("auto")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def loader_batch(shards: Path, batch: int = BATCH) -> dict:
    urls, total = shardset.shards(shards)
    cfg = LoaderConfig(batch_size=batch, workers=0, views=ViewConfig(size=64, small_size=32, num_proposals=2))
    return next(iter(make_stream(urls, cfg, seed=0, total_samples=total)))


def tiny_cfg(name: str):
    return replace(DEFAULTS[name], queue_size=256, proj_hidden=64, pred_hidden=64 if DEFAULTS[name].pred_hidden else 0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_falls_on_a_fixed_batch(name, device, shards, monkeypatch):
    """Every method learns on one batch with bf16 autocast and channels_last, as train.pretrain
    runs it on a GPU (tests/train/test_methods.py does the same in float32 on the CPU)."""
    cuda = device.type == "cuda"
    batch = prepare(loader_batch(shards), device, channels_last=cuda)
    torch.manual_seed(0)
    method = build(name, "resnet18", tiny_cfg(name), roi_size=7, bn_splits=2).to(device)
    if cuda:
        method = method.to(memory_format=torch.channels_last)
    if hasattr(method, "queue"):    # a repeated batch would fill the queue with its own positives
        monkeypatch.setattr(method.queue, "enqueue", lambda keys, ids=None: None)
    opt = torch.optim.SGD(method.trainable(), lr=0.05, momentum=0.9)
    g = torch.Generator(device=device).manual_seed(0)
    losses = []
    for step in range(STEPS):
        with autocast(device):
            loss, terms = method(batch, g, step / STEPS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), (step, losses)
        assert loss.dtype == torch.float32            # the losses compute in float32 under autocast
        losses.append(loss.item())
    n = max(2, STEPS // 5)
    assert sum(losses[-n:]) / n < 0.9 * sum(losses[:n]) / n, losses
    assert float(terms["key_std"]) > 0.1


def test_bf16_autocast_keeps_rois_float32(device, monkeypatch):
    """Under bf16 autocast the backbone runs in bf16, but RoIAlign gets float32 features and exact
    float32 RoIs (bf16 would round 33.3 px to 33.25 and an image index past 256)."""
    import train.resnet as resnet

    seen = {}
    real = resnet.roi_align

    def spy(x, rois, **kw):
        seen.update(x=x.dtype, rois=rois.dtype, values=rois.detach().clone())
        return real(x, rois, **kw)
    monkeypatch.setattr(resnet, "roi_align", spy)
    torch.manual_seed(0)
    enc = RegionEncoder("resnet18", 32, 16, roi_size=7).to(device)
    enc.c4.register_forward_hook(lambda m, i, o: seen.update(c4=o.dtype))
    x = torch.randn(2, 3, 64, 64, device=device)
    boxes = torch.tensor([[[1.3, 2.7, 33.3, 41.9], [5.1, 6.2, 60.7, 50.3]]] * 2, device=device)
    valid = torch.tensor([[True, True], [True, False]], device=device)
    with autocast(device, force=True):
        z = enc.regions(x, boxes, valid, groups=1)
    assert seen["c4"] == torch.bfloat16, "autocast did not put the backbone in bf16"
    assert seen["x"] == torch.float32 and seen["rois"] == torch.float32
    want = torch.cat([torch.tensor([[0.0], [0.0], [1.0]], device=device), boxes[valid]], 1)
    assert torch.equal(seen["values"], want)
    assert z.shape == (3, 16) and z.dtype == torch.bfloat16
    z.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_channels_last_matches_contiguous(device, shards):
    """The same encoder in channels_last (train.pretrain on CUDA) gives the contiguous result, and
    `prepare(channels_last=True)` hands over channels_last images."""
    b = prepare(loader_batch(shards), device, channels_last=True)
    assert b["x1"].is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    plain = RegionEncoder("resnet18", 32, 16, roi_size=7).to(device)
    last = RegionEncoder("resnet18", 32, 16, roi_size=7).to(device)
    last.load_state_dict(plain.state_dict())
    last = last.to(memory_format=torch.channels_last)
    assert last.c4[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = b["x1"].contiguous()
    za = plain.regions(x, b["boxes1"], b["valid"], 2)
    zb = last.regions(x.contiguous(memory_format=torch.channels_last), b["boxes1"], b["valid"], 2)
    assert torch.allclose(za, zb, rtol=1e-2, atol=1e-2), (za - zb).abs().max()
    za.square().sum().backward()
    zb.square().sum().backward()
    ga, gb = plain.c4[0].weight.grad, last.c4[0].weight.grad
    assert torch.isfinite(gb).all()
    assert torch.allclose(ga, gb, rtol=5e-2, atol=5e-2 * ga.abs().max().item()), (ga - gb).abs().max()


def test_shuffle_bn_on_the_device(device):
    """The teacher's shuffled batch-norm groups differ from the student's, rows come back in
    order, with the generator and tensors on the device."""
    B, splits = 8, 4
    x = torch.eye(B, device=device).view(B, B, 1, 1).expand(B, B, 2, 2).contiguous()
    bn = SplitBatchNorm2d(B, affine=False).to(device)

    def encode(t):
        with bn_segments(chunk_sizes(t.shape[0], splits)):
            return bn(t).flatten(1)
    g = torch.Generator(device=device).manual_seed(0)
    student = encode(x)
    teacher = shuffled_forward(encode, [x], torch.ones(B, dtype=torch.long, device=device), splits, g)
    assert teacher.device.type == device.type
    for i in range(B):
        s = set(torch.nonzero(student[i].abs().reshape(B, 4).sum(1) > 1e-6).flatten().tolist())
        t = set(torch.nonzero(teacher[i].abs().reshape(B, 4).sum(1) > 1e-6).flatten().tolist())
        assert i in s and i in t and len(s) == B // splits and s != t


def test_shuffle_bn_method_step(device, shards):
    """A d3ssl step with shuffle-BN over 2 batch-norm groups, its teacher's regions in order."""
    batch = prepare(loader_batch(shards), device, channels_last=device.type == "cuda")
    torch.manual_seed(0)
    method = build("d3ssl", "resnet18", tiny_cfg("d3ssl"), roi_size=7, bn_splits=2).to(device)
    assert method.cfg.shuffle_bn
    g = torch.Generator(device=device).manual_seed(0)
    with autocast(device):
        loss, _ = method(batch, g, 0.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert int(method.queue.filled) == 2 * int(batch["valid"].sum())


def test_sync_batchnorm_conversion(device, request):
    """SyncBN as train.pretrain converts the student (world > 1, no shuffle-BN: soco) and one step;
    on CUDA inside the 1-rank NCCL group, with the SyncBN kernels and their collectives checked
    against plain batch norm (SyncBatchNorm refuses CPU tensors in a group, so the CPU smoke runs
    the converted step without one)."""
    cuda = device.type == "cuda"
    if cuda:
        request.getfixturevalue("one_rank_group")
    torch.manual_seed(0)
    method = build("soco", "resnet18", tiny_cfg("soco"), roi_size=7).to(device)
    use_sync_batchnorm(method)
    bns = [m for m in method.student.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, torch.nn.SyncBatchNorm) for m in bns)
    assert not any(isinstance(m, SplitBatchNorm2d) for m in method.student.modules())
    _soco_step(method, device)
    if not cuda:
        return
    from torch.nn.modules._functions import SyncBatchNorm as sync_fn

    x = torch.randn(6, 8, 5, 5, device=device, requires_grad=True)
    w, b = torch.rand(8, device=device, requires_grad=True), torch.rand(8, device=device, requires_grad=True)
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    y = sync_fn.apply(x, w, b, rm, rv, 1e-5, 0.1, torch_dist.group.WORLD, 1)
    ref = F.batch_norm(x.detach(), None, None, w.detach(), b.detach(), True, 0.1, 1e-5)
    assert torch.allclose(y, ref, atol=1e-4)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def _soco_step(method, device):
    B, K = 4, 2
    g = torch.Generator(device=device).manual_seed(0)
    xy = torch.rand(B, K, 2, device=device) * 20
    boxes = torch.cat([xy, xy + 30], -1)
    batch = {"x1": torch.randn(B, 3, 64, 64, device=device), "x2": torch.randn(B, 3, 64, 64, device=device),
             "boxes1": boxes, "boxes2": boxes, "valid": torch.ones(B, K, dtype=torch.bool, device=device)}
    with autocast(device):
        loss, _ = method(batch, g, 0.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in method.trainable() if p.grad is not None)


def test_one_rank_process_group(device, one_rank_group, shards):
    """NCCL (gloo on the CPU) with one rank: collectives on device tensors, train.dist, and a
    DDP-wrapped d3ssl step as train.pretrain builds it."""
    assert torch_dist.get_backend() == one_rank_group
    assert dist.is_initialized() and dist.rank() == 0 and dist.world_size() == 1
    t = torch.arange(4.0, device=device)
    torch_dist.all_reduce(t)
    out = torch.empty(4, device=device)
    torch_dist.all_gather_into_tensor(out, t)
    torch_dist.broadcast(t, src=0)
    assert torch.equal(out, torch.arange(4.0, device=device))
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    torch.manual_seed(0)
    method = build("d3ssl", "resnet18", tiny_cfg("d3ssl"), roi_size=7, bn_splits=2).to(device)
    cuda = device.type == "cuda"
    if cuda:
        method = method.to(memory_format=torch.channels_last)
    model = torch.nn.parallel.DistributedDataParallel(method, device_ids=[device.index or 0] if cuda else None,
                                                      broadcast_buffers=False)
    opt = torch.optim.SGD(method.trainable(), lr=0.01, momentum=0.9)
    batch = prepare(loader_batch(shards), device, channels_last=cuda)
    g = torch.Generator(device=device).manual_seed(0)
    for step in range(2):
        with autocast(device):
            loss, _ = model(batch, g, 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    dist.average_buffers(method.student)
    dist.barrier()


def test_pinned_memory_transfer(device, shards):
    """A pinned loader batch moves with non_blocking=True (train.methods.prepare) to the same values."""
    if device.type != "cuda":
        pytest.skip("pinned memory needs CUDA; the CPU smoke covers prepare() in the other tests")
    raw = loader_batch(shards)
    pinned = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in raw.items()}
    assert pinned["x1"].is_pinned()
    a = prepare(pinned, device, channels_last=True)
    torch.cuda.current_stream().synchronize()
    b = prepare(raw, device)
    for k in ("x1", "x2", "x2s", "boxes1", "valid"):
        assert torch.equal(a[k], b[k]), k


def write_params(path: Path, device: torch.device) -> Path:
    """Tiny pre-training settings: ResNet-18, 64 px views, 2 proposals, 1 epoch of 6 steps."""
    workers = 2 if device.type == "cuda" else 1
    return tiny_params(path, loader={"workers": workers, "epoch_samples": 24 // workers * workers},
                       epochs=1, checkpoint_every=100, checkpoint_minutes=0, deterministic=False,
                       max_steps=0, snapshot_steps=[])


def test_pretrain_epoch_checkpoint_resume_export(device, shards, tmp_path, caplog):
    """train.pretrain on the device: a run stopped after 3 steps (checkpoint), resumed with
    `--resume` to the end of its epoch, exported, and the export loads into torchvision."""
    import logging

    from train.export import export
    from train.pretrain import load_config, main, method_config, train

    params = write_params(tmp_path / "params.yaml", device)
    cfg = replace(load_config(params), max_steps=3)
    run = tmp_path / "run"
    first = train(shards, run, "d3ssl", cfg, method_config("d3ssl", params), resume="never", device=device.type,
                  progress=False)
    assert first["steps"] == 3 and not first["finished"]
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 3
    if device.type == "cuda":
        assert state["rng"][0]["cuda"], "the checkpoint holds no CUDA RNG state"
    with caplog.at_level(logging.INFO, logger="train"):
        assert main(["--shards", str(shards), "--out", str(run), "--method", "d3ssl", "--params", str(params),
                     "--device", device.type, "--resume"]) == 0
    assert "resumed from step 3" in caplog.text
    import json

    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == summary["total_steps"] == 6, summary
    assert summary["epochs_done"] == 1, summary                   # the one epoch ran to its end
    info = export(run / "checkpoint.pt", tmp_path / "export")
    assert info["step"] == 6
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(tmp_path / "export" / "backbone.pth"), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and not unexpected
    student = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert torch.equal(net.conv1.weight, student["student.c4.0.weight"].float().contiguous())
