"""minibldm.conv: the matrix-product route of the UNet's 3x3 convolution and the autoencoder's
upsample-then-convolve on the input grid equal the plain layers, values and gradients, and are
taken exactly where their docstrings say."""
import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs

import minibldm.conv as conv
from minibldm.conv import Conv2d, conv3x3_as_matmul, upsample_conv, upsample_conv3x3


@pytest.mark.parametrize("shape,bias", [((2, 24, 4, 4), True), ((1, 16, 8, 6), False),
                                        ((3, 8, 1, 1), True)])
def test_as_matmul_equals_conv2d(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(12, shape[1], 3, 3, generator=g)
    b = torch.randn(12, generator=g) if bias else None
    want = F.conv2d(x, w, b, padding=1)
    got = conv3x3_as_matmul(x, w, b)
    assert got.shape == want.shape
    assert want.abs().mean() > 1
    assert max_abs(got, want) <= 1e-4


def test_route_is_taken_only_for_big_weights_on_small_grids_at_inference(monkeypatch):
    calls = []
    monkeypatch.setattr(conv, "conv3x3_as_matmul",
                        lambda *a: calls.append(1) or conv.F.conv2d(*a, padding=1))
    big = Conv2d(768, 768, 3, padding=1)  # 5.3 M weights >= BIG_WEIGHT
    assert big.weight.numel() >= conv.BIG_WEIGHT and big.as_matmul
    for module in (Conv2d(64, 64, 3, padding=1), Conv2d(768, 768, 3, stride=2, padding=1),
                   Conv2d(768, 768, 3, padding=2, dilation=2)):
        assert not module.as_matmul
    x_small, x_big = torch.randn(1, 768, 8, 8), torch.randn(1, 768, 9, 8)
    with torch.no_grad():
        big(x_small)
        assert len(calls) == 1
        big(x_big)  # 72 positions > SMALL_GRID
        assert len(calls) == 1
    big(x_small)  # gradients on: training keeps nn.Conv2d
    assert len(calls) == 1


def test_route_matches_nn_conv2d_in_the_module():
    g = torch.Generator().manual_seed(0)
    m = Conv2d(512, 1024, 3, padding=1)
    ref = torch.nn.Conv2d(512, 1024, 3, padding=1)
    ref.load_state_dict(m.state_dict())  # the same keys
    x = torch.randn(2, 512, 4, 4, generator=g)
    with torch.no_grad():
        assert max_abs(m(x), ref(x)) <= 1e-4


def test_export_sees_the_plain_convolution(monkeypatch):
    monkeypatch.setattr(conv, "BIG_WEIGHT", 0)
    m = Conv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        prog = torch.export.export(m, (x,))
        ops = {str(n.target) for n in prog.graph.nodes if n.op == "call_function"}
        assert any("conv" in o for o in ops) and not any("im2col" in o or "unfold" in o for o in ops), ops
        assert max_abs(prog.module()(x), m(x)) <= 1e-5


def upsample_then_conv(x, w, b):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)


@pytest.mark.parametrize("shape,bias,channels_last", [((2, 5, 4, 6), True, False),
                                                      ((1, 3, 1, 1), False, False),
                                                      ((2, 6, 3, 5), True, True)])
def test_upsample_conv3x3_equals_upsampling_then_conv2d(shape, bias, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(7, shape[1], 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    want, got = upsample_then_conv(x, w, b), upsample_conv3x3(x, w, b)
    assert got.shape == want.shape == (shape[0], 7, 2 * shape[2], 2 * shape[3])
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else
                             torch.contiguous_format)
    assert want.abs().mean() > 1 and max_abs(got, want) <= 1e-12
    # gradients reach x and the 3x3 kernel through the folded kernels
    up = torch.randn(want.shape, generator=g, dtype=torch.float64)
    inputs = [t for t in (x, w, b) if t is not None]
    for a, c in zip(torch.autograd.grad(want, inputs, up), torch.autograd.grad(got, inputs, up)):
        assert a.abs().mean() > 0.1 and max_abs(a, c) <= 1e-10


def test_upsample_route_is_taken_from_128_channels_on_and_not_in_export(monkeypatch):
    calls = []
    monkeypatch.setattr(conv, "upsample_conv3x3", lambda *a: calls.append(1) or upsample_then_conv(*a))
    assert conv.UPSAMPLE_MIN_CHANNELS == 128
    for c, taken in ((64, 0), (128, 1)):
        m = torch.nn.Conv2d(c, c, 3, padding=1)
        with torch.no_grad():
            y = upsample_conv(torch.randn(1, c, 3, 3), m)
        assert y.shape == (1, c, 6, 6) and len(calls) == taken
    monkeypatch.setattr(conv, "UPSAMPLE_MIN_CHANNELS", 1)
    from minibldm.autoencoder import Upsample
    module, x = Upsample(4).eval(), torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        module(x)
        assert len(calls) == 2  # eager takes the route, even at 4 channels now
        prog = torch.export.export(module, (x,))
    ops = {str(n.target) for n in prog.graph.nodes if n.op == "call_function"}
    assert any("upsample_nearest" in o for o in ops), ops
    assert len(calls) == 2
