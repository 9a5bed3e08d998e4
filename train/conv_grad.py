"""Convolution gradients as matrix products where the output map is small (CPU, float32).

On the CPU, oneDNN computes the weight gradient of a convolution whose output has few positions
per image far below its forward speed: for the res5 3x3 512 -> 512 convolution on the 128 regions
of an embedded batch (2x2 outputs), the backward takes several times the forward
(`benchmarks/results/conv_grad.json`, `python -m benchmarks.bench_conv_grad`). Unfolded (im2col),
both gradients of such a convolution are one matrix product each over the N x L output
positions:

    cols = unfold(x)                                  N x (C k k) x L
    dW   = dY (O x N L) @ cols^T (N L x C k k)
    dX   = fold(W^T (C k k x O) @ dY (O x N L))

`GemmGradConv2d` is an `nn.Conv2d` (same parameters, same state_dict: exported weights stay a
torchvision ResNet's) whose forward is the usual convolution and whose backward is the above,
where all of these hold: the input is on the CPU and needs or feeds a gradient, autocast is off
(bf16 keeps oneDNN's path), no compiler is tracing, groups 1, no bias, zero padding, and the
output has at most `MAX_POSITIONS` positions per image. Everywhere else (CUDA, the teacher under
no_grad, the evaluations, larger maps) it is `nn.Conv2d`. The gradients equal autograd's up to
float32 rounding (the summation order differs; `tests/train/test_conv_grad.py`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Output positions per image (H_out x W_out) up to which the matrix-product backward is used: 2x2,
# every res5 convolution on a 4x4 RoIAlign region (and on a 64 px view's 4x4 C4 map). From
# benchmarks/results/conv_grad.json on an AVX2 CPU: there forward + backward takes 0.51x, 0.77x and
# 0.89x of oneDNN's time for res5's three kinds of convolution, while at 4x4 (res4 on a 64 px view)
# it takes 1.14x and at larger maps 2-3x: oneDNN is slow only on the tiny maps.
MAX_POSITIONS = 4


class _MatmulGradConv(torch.autograd.Function):
    """conv2d (no bias, groups 1) whose backward is two matrix products over unfolded input."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation)
        return F.conv2d(x, weight, None, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        out_ch, k = weight.shape[0], weight.shape[1:].numel()
        kernel = weight.shape[-2:]
        n = x.shape[0]
        positions = grad_out.shape[-2] * grad_out.shape[-1]
        # (N, O, L) -> (N L, O), image-major rows, as the unfolded columns below
        g = grad_out.reshape(n, out_ch, positions).transpose(1, 2).reshape(n * positions, out_ch)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)   # N, C k k, L
            grad_w = (g.t() @ cols.transpose(1, 2).reshape(n * positions, k)).view_as(weight)
        if ctx.needs_input_grad[0]:
            grad_cols = (g @ weight.reshape(out_ch, k)).view(n, positions, k).transpose(1, 2)
            grad_x = F.fold(grad_cols, x.shape[-2:], kernel, dilation=dilation, padding=padding, stride=stride)
        return grad_x, grad_w, None, None, None


def _out_positions(conv: nn.Conv2d, height: int, width: int) -> int:
    size = []
    for n, k, s, p, d in zip((height, width), conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        size.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    return size[0] * size[1]


class GemmGradConv2d(nn.Conv2d):
    """nn.Conv2d with the matrix-product backward on small CPU maps (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.bias is None and self.groups == 1 and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad) and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and x.dim() == 4
                and _out_positions(self, x.shape[-2], x.shape[-1]) <= MAX_POSITIONS):
            return _MatmulGradConv.apply(x, self.weight, self.stride, self.padding, self.dilation)
        return super().forward(x)


def use_gemm_grad_conv(module: nn.Module) -> nn.Module:
    """Make every plain `nn.Conv2d` of `module` that fits (groups 1, no bias, zero padding) a
    `GemmGradConv2d`, in place. The class changes, nothing else: the same parameters and buffers."""
    for m in module.modules():
        if type(m) is nn.Conv2d and m.groups == 1 and m.bias is None and m.padding_mode == "zeros" \
                and isinstance(m.padding, tuple):
            m.__class__ = GemmGradConv2d
    return module
