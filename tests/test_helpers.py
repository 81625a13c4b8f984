"""The test helpers themselves: a comparison helper that cannot fail would hide every defect."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import max_rel_err


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("side", ["result", "reference"])
def test_max_rel_err_non_finite_fails(bad, side):
    good = [torch.ones(3), torch.ones(2, 2)]
    broken = [torch.ones(3), torch.tensor([[1.0, bad], [1.0, 1.0]])]
    args = (broken, good) if side == "result" else (good, broken)
    err = max_rel_err(*args)
    assert not err < 1e-5
    assert err == math.inf


def test_max_rel_err_measures_and_refuses_mismatched_lists():
    q = [torch.tensor([2.0, -4.0])]
    assert max_rel_err([torch.tensor([2.0, -3.0])], q) == pytest.approx(0.25)
    assert max_rel_err(q, q) == 0.0
    assert max_rel_err(q, q + q) == math.inf
    assert max_rel_err([torch.ones(3)], [torch.ones(2)]) == math.inf
