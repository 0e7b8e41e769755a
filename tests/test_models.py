"""WRN architecture: exact parameter counts, layer names/shapes, fx tracing, init, wiring."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from distill.models import BasicBlock, WideResNet, wrn16_2, wrn40_2


def expected_params(depth: int, k: int, num_classes: int = 10) -> int:
    """Parameter count from the WRN definition (independent of the implementation)."""
    n = (depth - 4) // 6
    bn = lambda c: 2 * c  # noqa: E731  (weight + bias; running stats are buffers)
    total = 3 * 16 * 9  # stem conv3x3, no bias
    c_in = 16
    for width in (16 * k, 32 * k, 64 * k):
        for i in range(n):
            cin = c_in if i == 0 else width
            total += bn(cin) + cin * width * 9 + bn(width) + width * width * 9
            if cin != width:
                total += cin * width  # 1x1 projection shortcut
        c_in = width
    return total + bn(64 * k) + 64 * k * num_classes + num_classes


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_exact() -> None:
    assert n_params(wrn40_2()) == expected_params(40, 2) == 2_243_546
    assert n_params(wrn16_2()) == expected_params(16, 2) == 691_674
    assert n_params(WideResNet(10, 1)) == expected_params(10, 1)
    assert n_params(WideResNet(16, 2, num_classes=100)) == expected_params(16, 2, 100)


def test_module_names_and_cam_layer_shapes() -> None:
    net = wrn16_2().eval()
    top = [name for name, _ in net.named_children()]
    assert top == ["conv1", "block1", "block2", "block3", "bn", "relu", "pool", "fc"]
    assert isinstance(net.relu, nn.ReLU) and not net.relu.inplace
    assert isinstance(net.pool, nn.AdaptiveAvgPool2d)
    assert all(not m.inplace for m in net.modules() if isinstance(m, nn.ReLU))
    shapes = {}
    for name in ("block1", "block2", "block3", "relu"):
        net.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert shapes == {
        "block1": (2, 32, 32, 32),
        "block2": (2, 64, 16, 16),
        "block3": (2, 128, 8, 8),
        "relu": (2, 128, 8, 8),
    }


def test_head_is_fx_traceable_pointwise_gap_linear() -> None:
    net = wrn16_2().eval()
    gm = torch.fx.symbolic_trace(net)
    ops = [n.target for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert ops[-5:] == ["bn", "relu", "pool", torch.flatten, "fc"]
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(gm(x), net(x))
    # the head equals relu(bn(block3)) -> spatial mean -> linear
    feats = net.relu(net.bn(net.block3(net.block2(net.block1(net.conv1(x))))))
    torch.testing.assert_close(net.fc(feats.mean((2, 3))), net(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_initialization_attention_transfer() -> None:
    torch.manual_seed(0)
    net = wrn40_2()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            assert m.bias is None
        if isinstance(m, nn.BatchNorm2d):
            assert float(m.weight.min()) >= 0.0 and float(m.weight.max()) < 1.0
            assert float(m.bias.abs().max()) == 0.0
    conv = net.block3[0].conv1  # 128 -> 128, 3x3: fan_in = 1152
    assert abs(conv.weight.std().item() - (2 / (128 * 9)) ** 0.5) < 0.05 * (2 / (128 * 9)) ** 0.5
    assert abs(net.fc.weight.std().item() - (2 / 128) ** 0.5) < 0.15 * (2 / 128) ** 0.5
    assert float(net.fc.bias.abs().max()) == 0.0
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())


def test_projection_shortcut_takes_preactivated_input() -> None:
    torch.manual_seed(0)
    block = BasicBlock(16, 32, stride=2).eval()
    with torch.no_grad():
        for bn in (block.bn0, block.bn1):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 16, 16)
    o1 = F.relu(
        F.batch_norm(
            x, block.bn0.running_mean, block.bn0.running_var, block.bn0.weight, block.bn0.bias
        )
    )
    y = F.conv2d(o1, block.conv0.weight, stride=2, padding=1)
    o2 = F.relu(
        F.batch_norm(
            y, block.bn1.running_mean, block.bn1.running_var, block.bn1.weight, block.bn1.bias
        )
    )
    z = F.conv2d(o2, block.conv1.weight, padding=1)
    expected = z + F.conv2d(o1, block.convdim.weight, stride=2)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(block(x), z + F.conv2d(x, block.convdim.weight, stride=2))


def test_identity_shortcut_when_width_is_unchanged() -> None:
    block = BasicBlock(32, 32).eval()
    assert block.convdim is None
    x = torch.randn(1, 32, 8, 8)
    z = block.conv1(block.relu1(block.bn1(block.conv0(block.relu0(block.bn0(x))))))
    torch.testing.assert_close(block(x), z + x)


def test_first_group_projection_only_when_widened() -> None:
    assert WideResNet(16, 1).block1[0].convdim is None
    assert WideResNet(16, 2).block1[0].convdim is not None
    assert WideResNet(16, 2).arch == "wrn-16-2"


@pytest.mark.parametrize("depth", [12, 15, 4])
def test_bad_depth_rejected(depth: int) -> None:
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth, 2)
