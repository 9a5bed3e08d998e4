"""Shuffle-BN: the teacher's batch-norm groups differ from the student's, and un-shuffling
restores the order; split batch norm normalises each group with its own statistics."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from train.model import RegionEncoder, SplitBatchNorm2d, bn_segments, chunk_sizes, region_segments
from train.shuffle_bn import key_groups, key_order, query_groups, shuffled_forward


def group_members(groups: torch.Tensor) -> list[set[int]]:
    """For every sample, the samples that share its batch-norm group."""
    return [set(torch.nonzero(groups == groups[i]).flatten().tolist()) for i in range(len(groups))]


@pytest.mark.parametrize("world,batch,splits", [(1, 8, 4), (1, 32, 4), (1, 10, 3), (2, 8, 2), (4, 6, 1)])
def test_key_groups_never_equal_query_groups(world, batch, splits):
    q = group_members(query_groups(world, batch, splits))
    for seed in range(20):
        order = key_order(world, batch, splits, torch.Generator().manual_seed(seed))
        assert sorted(order.tolist()) == list(range(world * batch))           # a permutation
        k = group_members(key_groups(order, world, batch, splits))
        for i in range(world * batch):
            assert i in k[i] and k[i] != q[i], (seed, i, q[i], k[i])
            assert len(k[i] & q[i]) < len(q[i])
            # stratified: with equal groups a key group of m takes at most ceil(m / Q) of any query group
            m, n_groups = len(k[i]), world * splits
            if batch % splits == 0:
                assert len(k[i] & q[i]) <= -(-m // n_groups) < len(q[i])


def onehot_bn(splits: int):
    """Images whose channel j is 1 only for sample j; after batch norm in training mode, sample i
    has a non-zero channel j exactly when j shares i's statistics."""
    bn = SplitBatchNorm2d(8, affine=False)

    def encode(x):
        with bn_segments(chunk_sizes(x.shape[0], splits)):
            return bn(x).flatten(1)
    return encode


def test_the_teacher_normalises_each_sample_with_other_samples_than_the_student():
    B, splits = 8, 4
    x = torch.eye(B).view(B, B, 1, 1).expand(B, B, 2, 2).contiguous()
    encode = onehot_bn(splits)
    student = encode(x)
    teacher = shuffled_forward(encode, [x], torch.ones(B, dtype=torch.long), splits, torch.Generator().manual_seed(0))
    for i in range(B):
        s_peers = set(torch.nonzero(student[i].abs().reshape(B, 4).sum(1) > 1e-6).flatten().tolist())
        t_peers = set(torch.nonzero(teacher[i].abs().reshape(B, 4).sum(1) > 1e-6).flatten().tolist())
        assert i in s_peers and i in t_peers            # row i is sample i's output: order restored
        assert len(s_peers) == B // splits and s_peers != t_peers


def test_unshuffling_restores_the_order_of_regions():
    B, K = 6, 3
    g = torch.Generator().manual_seed(1)
    valid = torch.rand(B, K, generator=g) < 0.6
    valid[:, 0] = True
    tags = torch.arange(B * K, dtype=torch.float32).view(B, K)

    def encode(t, v):        # one row per valid box, image-major: the box's tag
        return t[v][:, None]
    out = shuffled_forward(encode, [tags, valid], valid.sum(1), 3, torch.Generator().manual_seed(2))
    assert torch.equal(out[:, 0], tags[valid])


def test_split_batch_norm_uses_each_groups_statistics_and_keeps_the_state_dict():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    x[4:] = x[4:] * 5 + 3
    split = SplitBatchNorm2d(3)
    plain = nn.BatchNorm2d(3)
    with bn_segments([4, 4]):
        y = split(x)
    assert torch.allclose(y[:4], nn.functional.batch_norm(x[:4], None, None, training=True), atol=1e-5)
    assert torch.allclose(y[4:], nn.functional.batch_norm(x[4:], None, None, training=True), atol=1e-5)
    assert not torch.allclose(y, plain(x), atol=1e-3)
    assert torch.allclose(split(x), plain(x), atol=1e-5)                # no segments: plain BN
    enc = RegionEncoder("resnet18", proj_dim=16)
    import torchvision
    torchvision.models.resnet18(weights=None).load_state_dict({**enc.backbone_state_dict(), **{
        k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if k.startswith("fc.")}})
    assert region_segments(torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1]]).bool(), 2) == [3, 3]


def test_rois_stay_float32_under_bf16_autocast(monkeypatch):
    """Box coordinates must not be rounded to bf16 (1 px steps at 128-256, inexact image indices)."""
    import train.resnet as resnet
    seen = {}
    real = resnet.roi_align

    def spy(inp, rois, **kw):
        seen["dtype"], seen["rois"] = rois.dtype, rois.clone()
        return real(inp, rois, **kw)
    monkeypatch.setattr(resnet, "roi_align", spy)
    enc = RegionEncoder("resnet18", proj_dim=8, roi_size=2).eval()
    boxes = torch.tensor([[[1.3, 2.7, 200.9, 255.1]]]).expand(300, 1, 4).contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        enc.regions(torch.zeros(300, 3, 32, 32), boxes, torch.ones(300, 1, dtype=torch.bool))
    assert seen["dtype"] == torch.float32
    assert torch.equal(seen["rois"][:, 1:], boxes[:, 0]) and torch.equal(seen["rois"][:, 0], torch.arange(300.0))


def _two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as td
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        B, K = 4, 2
        valid = torch.ones(B, K, dtype=torch.bool)
        valid[rank::2, 1] = False                                  # unequal row counts per rank
        tags = (rank * 100 + torch.arange(B * K, dtype=torch.float32)).view(B, K)
        # the generator differs per rank: rank 0's order must be broadcast to every rank
        g = torch.Generator().manual_seed(10 + rank)
        rows = shuffled_forward(lambda t, v: t[v][:, None], [tags, valid], valid.sum(1), 1, g)
        x = torch.zeros(B, world * B, 2, 2)
        x[torch.arange(B), rank * B + torch.arange(B)] = 1.0       # one-hot over the global batch
        bn = SplitBatchNorm2d(world * B, affine=False)
        peers = shuffled_forward(lambda t: bn(t).flatten(1), [x], torch.ones(B, dtype=torch.long), 1,
                                 torch.Generator().manual_seed(3))
        torch.save({"rows": rows, "tags": tags[valid], "peers": peers}, f"{out}/rank{rank}.pt")
    finally:
        td.destroy_process_group()


def test_under_ddp_keys_are_encoded_on_other_ranks_and_come_back_in_order(tmp_path):
    """2 gloo processes: the un-shuffled rows are each rank's own, in order, and a key's batch
    statistics come from a shuffled group that is not its rank's (its query's) batch."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    B = 4
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(r["rows"][:, 0], r["tags"])
        own = set(range(rank * B, rank * B + B))
        for i in range(B):
            peers = set(torch.nonzero(r["peers"][i].view(2 * B, 4).abs().sum(1) > 1e-6).flatten().tolist())
            assert rank * B + i in peers and len(peers) == B and peers != own


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_batch_norm_of_equal_groups_equals_a_loop_over_them(dtype):
    """Equal segments run as one fused batch-norm call (groups moved into channels): outputs, the
    gradients of input, weight and bias, and the running statistics (the mean over the segments of
    their means and unbiased variances, MoCo's SplitBatchNorm) equal a loop over the segments."""
    torch.manual_seed(0)
    x = (torch.randn(12, 5, 3, 4) * torch.tensor([1.0, 3.0, 0.5]).repeat_interleave(4).view(12, 1, 1, 1) + 2).to(dtype)
    split = SplitBatchNorm2d(5, momentum=0.2)
    with torch.no_grad():
        split.weight.uniform_(0.5, 1.5), split.bias.uniform_(-1, 1)
    w, b = split.weight.detach().clone().requires_grad_(), split.bias.detach().clone().requires_grad_()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with bn_segments([4, 4, 4]):
        y1 = split(x1)
    y2 = torch.cat([nn.functional.batch_norm(c, None, None, w, b, True, 0.0, split.eps) for c in x2.split(4)])
    probe = torch.randn(y1.shape)
    (y1.float() * probe).sum().backward()
    (y2.float() * probe).sum().backward()
    assert torch.allclose(y1.float(), y2.float(), atol=1e-6)
    assert torch.allclose(x1.grad.float(), x2.grad.float(), atol=1e-5)
    assert torch.allclose(split.weight.grad, w.grad, atol=1e-4) and torch.allclose(split.bias.grad, b.grad, atol=1e-4)
    chunks = [c.float() for c in x.split(4)]
    mean = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    var = torch.stack([c.var((0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    assert torch.allclose(split.running_mean, 0.2 * mean, atol=1e-5)
    assert torch.allclose(split.running_var, 0.8 + 0.2 * var, atol=1e-4)
    assert int(split.num_batches_tracked) == 1
