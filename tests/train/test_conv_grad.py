"""The matrix-product backward of small CPU convolutions (train.conv_grad) gives autograd's
gradients, is used only where it should be, and leaves the model's state untouched."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from train import conv_grad
from train.conv_grad import MAX_POSITIONS, GemmGradConv2d, use_gemm_grad_conv
from train.model import RegionEncoder, momentum_copy


def conv_pair(cin, cout, k, stride, padding, dilation=1):
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=False)
    fast = nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=False)
    fast.load_state_dict(plain.state_dict())
    use_gemm_grad_conv(fast)
    return plain, fast


def grads(conv, x, grad_out):
    x = x.clone().requires_grad_()
    y = conv(x)
    y.backward(grad_out)
    return y, x.grad, conv.weight.grad


# (in, out, kernel, stride, padding, input side, batch, dilation): res5's stride-2 3x3 and 1x1
# downsample from 4x4 RoIAlign regions, its 3x3 at 2x2, a res4 3x3 at 4x4, an odd side with a
# stride, then non-square kernels, strides, paddings and inputs, and a dilation
@pytest.mark.parametrize("cin,cout,k,stride,padding,side,n,dilation", [
    (32, 64, 3, 2, 1, 4, 12, 1), (32, 64, 1, 2, 0, 4, 12, 1), (64, 64, 3, 1, 1, 2, 12, 1), (16, 16, 3, 1, 1, 4, 5, 1),
    (8, 16, 3, 2, 1, 7, 3, 1), (8, 16, (3, 1), (2, 1), (1, 0), (5, 3), 3, 1), (8, 8, 3, 1, 2, (4, 6), 2, 2),
])
def test_gradients_equal_autograds(cin, cout, k, stride, padding, side, n, dilation, monkeypatch):
    monkeypatch.setattr(conv_grad, "MAX_POSITIONS", 10 ** 9)     # the path on every map: the gradients' maths
    plain, fast = conv_pair(cin, cout, k, stride, padding, dilation)
    g = torch.Generator().manual_seed(1)
    h, w = (side, side) if isinstance(side, int) else side
    x = torch.randn(n, cin, h, w, generator=g)
    grad_out = torch.randn(plain(x).shape, generator=g)
    y0, gx0, gw0 = grads(plain, x, grad_out)
    y1, gx1, gw1 = grads(fast, x, grad_out)
    assert type(y1.grad_fn).__name__.startswith("_MatmulGradConv"), "the small map did not take the fast path"
    assert torch.equal(y0, y1)                                   # the forward is the same convolution
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-4)


def test_weight_only_and_input_only_gradients():
    plain, fast = conv_pair(16, 16, 3, 1, 1)
    x = torch.randn(4, 16, 2, 2)
    fast(x).sum().backward()                                     # the input needs no gradient
    plain(x).sum().backward()
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)
    fast.weight.requires_grad_(False)
    xr = x.clone().requires_grad_()
    fast(xr).sum().backward()                                    # a frozen conv still passes the gradient on
    xp = x.clone().requires_grad_()
    plain(xp).sum().backward()
    torch.testing.assert_close(xr.grad, xp.grad, rtol=1e-4, atol=1e-5)


def test_the_usual_convolution_everywhere_else():
    _, fast = conv_pair(8, 8, 3, 1, 1)
    side = int(MAX_POSITIONS ** 0.5)
    small = torch.randn(2, 8, side, side, requires_grad=True)
    assert type(fast(small).grad_fn).__name__.startswith("_MatmulGradConv")
    big = torch.randn(2, 8, side + 1, side + 1, requires_grad=True)  # one row and column over the limit
    assert not type(fast(big).grad_fn).__name__.startswith("_MatmulGradConv")
    row = torch.randn(2, 8, 1, MAX_POSITIONS + 1, requires_grad=True)  # one position over the limit
    assert not type(fast(row).grad_fn).__name__.startswith("_MatmulGradConv")
    row = torch.randn(2, 8, 1, MAX_POSITIONS, requires_grad=True)      # exactly at it
    assert type(fast(row).grad_fn).__name__.startswith("_MatmulGradConv")
    with torch.no_grad():
        assert fast(small).grad_fn is None                       # the teacher, the evaluations
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not type(fast(small).grad_fn).__name__.startswith("_MatmulGradConv")   # bf16 keeps oneDNN's


def test_the_region_encoder_keeps_torchvisions_state_and_its_gradients(monkeypatch):
    torch.manual_seed(0)
    enc = RegionEncoder("resnet18", proj_dim=16, roi_size=4)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is GemmGradConv2d for m in convs)
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(enc.backbone_state_dict(), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    teacher = momentum_copy(enc)                                 # the teacher: a deep copy, same classes
    assert all(type(m) is GemmGradConv2d for m in teacher.modules() if isinstance(m, nn.Conv2d))
    restored = RegionEncoder("resnet18", proj_dim=16, roi_size=4)
    restored.load_state_dict(enc.state_dict())                   # a checkpoint round trip

    images = torch.randn(4, 3, 64, 64)
    boxes = torch.tensor([[4.0, 4.0, 40.0, 40.0], [20.0, 10.0, 60.0, 50.0]]).expand(4, 2, 4)
    valid = torch.ones(4, 2, dtype=torch.bool)

    def weight_grads():
        enc.zero_grad(set_to_none=True)
        enc.regions(images, boxes, valid, groups=2).square().sum().backward()
        return [m.weight.grad.clone() for m in convs]

    calls = []
    apply = conv_grad._MatmulGradConv.apply
    monkeypatch.setattr(conv_grad._MatmulGradConv, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))
    fast = weight_grads()
    # res5's three kinds of convolution on the 8 regions' 4x4 RoIAlign maps (2x2 out) took the path
    assert len(calls) == 5 and all(shape[0] == 8 for shape in calls), calls
    for m in convs:
        m.__class__ = nn.Conv2d                                  # oneDNN's backward, the same weights
    plain = weight_grads()
    for f, p in zip(fast, plain):
        torch.testing.assert_close(f, p, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kwargs", [{"bias": True}, {"groups": 2, "bias": False},
                                    {"padding_mode": "reflect", "bias": False}, {"padding": "same", "bias": False}])
def test_a_conv_the_matrix_products_do_not_cover_keeps_its_own_backward(kwargs):
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 8, 3, padding=kwargs.pop("padding", 1), **kwargs)
    fast = GemmGradConv2d(plain.in_channels, plain.out_channels, 3, padding=plain.padding,
                          padding_mode=plain.padding_mode, groups=plain.groups, bias=plain.bias is not None)
    fast.load_state_dict(plain.state_dict())                    # built directly, not by use_gemm_grad_conv
    x = torch.randn(2, 8, 2, 2)
    grad_out = torch.randn(2, 8, 2, 2)
    y0, gx0, gw0 = grads(plain, x, grad_out)
    y1, gx1, gw1 = grads(fast, x, grad_out)
    assert not type(y1.grad_fn).__name__.startswith("_MatmulGradConv")
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1) and torch.equal(gw0, gw1)

