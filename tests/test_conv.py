"""minibldm.conv: the matrix-product route of the UNet's 3x3 convolution equals nn.Conv2d, and is
taken exactly where its docstring says."""
import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs

import minibldm.conv as conv
from minibldm.conv import Conv2d, conv3x3_as_matmul


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
