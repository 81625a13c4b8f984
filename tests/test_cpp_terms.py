"""The C++ kernel of ``asft::anchoring_terms_``: the anchoring terms of a bucket in one
dispatched op, against the eager math in float64, op checks, bad input."""

from __future__ import annotations

import shutil

import pytest
import torch

from asft_kernels.errors import OptimizerInputError
from asft_kernels.ops import EAGER, cpp, eager, resolve_backend

# (L, k, r): k of 1, r of 1, odd sizes, one pair and many
SHAPES = [(1, 1, 1), (3, 1, 4), (2, 5, 1), (4, 7, 3), (1, 17, 13), (9, 8, 8), (5, 33, 19), (2, 64, 64)]
# max |got − float64| / max |float64| per math dtype (summation orders differ)
TOLERANCE = {torch.float64: 1e-13, torch.float32: 1e-5}


@pytest.fixture(scope="module", autouse=True)
def built():
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert cpp.is_available(), f"C++ backend failed to build: {cpp._State.error}"


def _inputs(L, k, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(L, k, r, generator=g, dtype=torch.float64)
    Bt = torch.randn(L, r, r + 3, generator=g, dtype=torch.float64)
    At = torch.randn(L, r, 2 * r + 1, generator=g, dtype=torch.float64)
    c = torch.rand(L, k, 1, generator=g, dtype=torch.float64)
    ins = dict(P=P, G=Bt @ Bt.mT, M=At @ At.mT, w=2 * c - c * c)
    return {name: t.to(dtype) for name, t in ins.items()}


def _outputs(L, k, r, dtype, fill=float("nan")):
    return dict(Q_B=torch.full((L, r, r), fill, dtype=dtype), R_B=torch.full((L, k, r), fill, dtype=dtype),
                H=torch.full((L, r, r), fill, dtype=dtype))


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_pair", [False, True], ids=["scalar", "coef"])
def test_terms_match_eager_math_in_float64(shape, dtype, per_pair):
    L, k, r = shape
    ins = _inputs(L, k, r, dtype, seed=L * 100 + k * 10 + r)
    coef = torch.linspace(0.5, 2.0, L, dtype=torch.float64)[:, None, None]
    two_lam = coef * 0.6 if per_pair else 0.6
    ref_ins = {n: t.double() for n, t in ins.items()}
    want = _outputs(L, k, r, torch.float64)
    want_R = eager.anchoring_terms(*ref_ins.values(), two_lam, *want.values())
    got = _outputs(L, k, r, dtype)
    got_R = cpp.terms(*ins.values(), two_lam.to(dtype) if per_pair else two_lam, *got.values())
    assert got_R.shape == () and got_R.dtype == dtype
    assert _rel(got_R, want_R) <= TOLERANCE[dtype], (got_R, want_R)
    for name in ("Q_B", "R_B", "H"):
        assert _rel(got[name], want[name]) <= TOLERANCE[dtype], name
    # the eager math in the same dtype lands as close
    same = _outputs(L, k, r, dtype)
    same_R = eager.anchoring_terms(*ins.values(), two_lam.to(dtype) if per_pair else two_lam, *same.values())
    assert _rel(same_R, want_R) <= TOLERANCE[dtype]


def test_op_with_coef_and_two_lam_and_a_new_loss_each_call():
    L, k, r = 3, 4, 2
    ins = _inputs(L, k, r, torch.float64, seed=7)
    coef = torch.tensor([1.0, 0.25, 3.0], dtype=torch.float64)[:, None, None]
    want = _outputs(L, k, r, torch.float64)
    want_R = eager.anchoring_terms(*ins.values(), coef * 1.5, *want.values())
    got = _outputs(L, k, r, torch.float64)
    R1 = torch.ops.asft.anchoring_terms_(*ins.values(), coef, 1.5, *got.values())
    R2 = torch.ops.asft.anchoring_terms_(*ins.values(), coef, 1.5, *got.values())
    assert R1.data_ptr() != R2.data_ptr() and torch.equal(R1, R2)
    torch.testing.assert_close(R1, want_R, rtol=1e-13, atol=0)
    for name in ("Q_B", "R_B", "H"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-13, atol=1e-13)


def test_backends_implement_the_contract():
    chosen = resolve_backend("cpp", torch.device("cpu"))
    assert (chosen.prepare, chosen.step, chosen.stats_pass) == (cpp.prepare, cpp.step, cpp.stats_pass)
    assert (EAGER.prepare, EAGER.step) == (eager.prepare, eager.step)


def test_opcheck_anchoring_terms():
    for dtype in (torch.float32, torch.float64):
        ins = _inputs(4, 5, 3, dtype, seed=3)
        coef = torch.rand(4, 1, 1, dtype=dtype)
        for c in (None, coef):
            args = (*ins.values(), c, 0.7, *_outputs(4, 5, 3, dtype, fill=0.0).values())
            torch.library.opcheck(torch.ops.asft.anchoring_terms_.default, args)


@pytest.mark.parametrize("bad, match", [
    (lambda a: a.update(P=a["P"][:, :, :2].contiguous()), r"G must have shape \(L, r, r\) = \(2, 2, 2\).*\(2, 3, 3\)"),
    (lambda a: a.update(w=a["w"][:, :3]), r"w must have shape \(L, k, 1\) = \(2, 4, 1\).*\(2, 3, 1\)"),
    (lambda a: a.update(M=a["M"].double()), r"M must be Float like P, found Double"),
    (lambda a: a.update(P=a["P"].to(torch.bfloat16)), r"P must be fp32/fp64, found BFloat16"),
    (lambda a: a.update(P=a["P"][0]), r"P must be 3-d \(L, k, r\), found \(4, 3\)"),
    (lambda a: a.update(G=a["G"].mT), r"G must be contiguous"),
    (lambda a: a.update(coef=torch.ones(3, 1, 1)), r"coef must have shape \(L, 1, 1\) = \(2, 1, 1\).*\(3, 1, 1\)"),
    (lambda a: a.update(coef=torch.ones(2, 1, 1, dtype=torch.float64)), r"coef must be Float like P"),
    (lambda a: a.update(H=torch.zeros(2, 3, 3, dtype=torch.float64)), r"H must be Float like P, found Double"),
    (lambda a: a.update(R_B=torch.zeros(2, 3, 4)), r"R_B must have shape \(L, k, r\) = \(2, 4, 3\).*\(2, 3, 4\)"),
    (lambda a: a.update(Q_B=torch.zeros(2, 3, 6)[:, :, ::2]), r"Q_B must be contiguous"),
], ids=["P-shape", "w-shape", "M-dtype", "P-dtype", "P-dim", "G-layout", "coef-shape", "coef-dtype", "H-dtype",
        "R_B-shape", "Q_B-layout"])
def test_bad_input_raises_and_writes_nothing(bad, match):
    args = dict(_inputs(2, 4, 3, torch.float32, seed=5), coef=None, two_lam=0.5)
    args.update(_outputs(2, 4, 3, torch.float32, fill=7.0))
    bad(args)
    outs = {n: args[n] for n in ("Q_B", "R_B", "H")}
    before = {n: t.clone() for n, t in outs.items()}
    with pytest.raises(ValueError, match=match):
        torch.ops.asft.anchoring_terms_(*args.values())
    for n, t in outs.items():
        assert torch.equal(t, before[n]), n
    two_lam = args.pop("coef")
    two_lam = args.pop("two_lam") if two_lam is None else two_lam * args.pop("two_lam")
    with pytest.raises(OptimizerInputError, match=match):
        cpp.terms(args["P"], args["G"], args["M"], args["w"], two_lam, args["Q_B"], args["R_B"], args["H"])
    for n, t in outs.items():
        assert torch.equal(t, before[n]), n
