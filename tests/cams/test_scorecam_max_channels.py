"""ScoreCAM's max_channels option against a reference built from the exact per-channel scores."""

from __future__ import annotations

import pytest
import torch

import cams
from distill.models import WideResNet


def test_max_channels_equals_softmax_over_the_top_channels():
    torch.manual_seed(0)
    model = WideResNet(10, 1).eval()
    x, targets = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    captured = {}
    handle = model.block3.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    acts = captured["a"]
    exact = cams.ScoreCAM(model, "block3")
    torch.testing.assert_close(
        cams.ScoreCAM(model, "block3", max_channels=acts.shape[1])(x, targets), exact(x, targets)
    )
    k = 3
    scores = exact.scores(x, acts, targets)
    top = acts.mean((2, 3)).topk(k, 1).indices
    ref = torch.stack(
        [
            torch.relu(
                (torch.softmax(scores[b, top[b]], 0)[:, None, None] * acts[b, top[b]]).sum(0)
            )
            for b in range(2)
        ]
    )
    torch.testing.assert_close(cams.ScoreCAM(model, "block3", max_channels=k)(x, targets), ref)


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_max_channels_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="max_channels"):
        cams.ScoreCAM(WideResNet(10, 1), "block3", max_channels=bad)
