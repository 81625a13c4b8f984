"""Anchors truncated to a tolerance: the bound on how much dropping directions changes the
published R (mode ``paper``), checked against ``reference.paper_regularizer`` in float64."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import odd_lora

import asft_kernels as asft
from asft_kernels.anchor import _factorize, dropped_paper_bounds, entry_paper_bound, paper_weight_bound
from asft_kernels.errors import AsFTError
from asft_kernels.reference import paper_regularizer

M, N = 37, 123  # OddNet's "up" layer: delta (37, 123), full rank 37


def _delta(scale: float, seed: int = 0) -> torch.Tensor:
    """V (37, 123) with singular values ``scale · 0.8^i``: for large ``scale`` the leading
    cᵢ = sᵢ²/‖V‖_F exceed 2 (negative wᵢ), then pass 1 and fall towards 0."""
    g = torch.Generator().manual_seed(seed)
    Q1, _ = torch.linalg.qr(torch.randn(M, M, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(N, M, generator=g, dtype=torch.float64))
    s = scale * 0.8 ** torch.arange(M, dtype=torch.float64)
    return (Q1 * s) @ Q2.T


def _factor(V, **kw):
    kw = {"rank": None, "energy": None, "method": "exact", "oversample": 10, "niter": 4, "seed": 0,
          "dtype": torch.float64, "name": "up", "tolerance": None, **kw}
    return _factorize(V, kw.pop("rank"), kw.pop("energy"), **kw)


def _R(model, entry) -> float:
    binding = asft.AlignmentAnchor({"up": entry}).bind(model, strict=False)
    return float(paper_regularizer(binding))


def _lora_product(model):
    layer = model.base_model.model.up
    return layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def test_weight_bound_is_the_max_of_abs_w_on_the_interval():
    grid = torch.linspace(0, 4, 40001, dtype=torch.float64)
    for c_max in (0.0, 0.3, 1.0, 1.7, 2.0, 2.3, 1 + math.sqrt(2), 3.0, 3.9):
        w = (grid[grid <= c_max] * (2 - grid[grid <= c_max])).abs().max()
        assert paper_weight_bound(c_max) == pytest.approx(float(w), abs=1e-6)


@pytest.mark.parametrize("scale", [0.5, 6.0, 30.0])
def test_dropped_directions_change_R_by_at_most_the_bound_times_BA_squared(scale):
    V = _delta(scale)
    full, full_bound = _factor(V)
    assert full.rank == M and full_bound == 0.0
    c = full.s.square() / full.fro_norm
    if scale == 30.0:
        assert float(c.max()) > 2  # negative weights are exercised
    bounds = dropped_paper_bounds(full.s, full.fro_norm, M)
    w = (c * (2 - c)).abs()
    torch.manual_seed(0)
    models = [odd_lora(r=3, seed=seed, targets=("up",)) for seed in range(3)]
    tight = 0
    for k in range(1, M):
        entry, bound = _factor(V, rank=k)
        assert entry.rank == k and bound == pytest.approx(float(w[k:].max()), rel=1e-12) == bounds[k]
        for model in models:
            BA2 = float(_lora_product(model).square().sum())
            gap = abs(_R(model, entry) - _R(model, full))
            assert gap <= bound * BA2 * (1 + 1e-9) + 1e-12
        # B A along the dropped direction of largest |w|: the bound is reached
        j = k + int(w[k:].argmax())
        model = models[0]
        layer = model.base_model.model.up
        with torch.no_grad():
            layer.lora_B["default"].weight.zero_()
            layer.lora_B["default"].weight[:, 0] = full.U[:, j]
        BA2 = float(_lora_product(model).square().sum())
        gap = abs(_R(model, entry) - _R(model, full))
        assert gap == pytest.approx(bound * BA2, rel=1e-8)
        tight += 1
    assert tight == M - 1


def test_tolerance_picks_the_smallest_k_within_it():
    V = _delta(6.0)
    full, _ = _factor(V)
    bounds = dropped_paper_bounds(full.s, full.fro_norm, M)
    for tau in (0.5, 0.1, 1e-2, 1e-4, 1e-8):
        entry, bound = _factor(V, tolerance=tau)
        k = entry.rank
        assert bound <= tau and bound == bounds[k]
        assert k == 1 or bounds[k - 1] > tau  # one direction fewer would exceed it
    assert _factor(V, tolerance=0.0)[0].rank == M
    # rank caps the tolerance's k: the bound then says what was reached
    entry, bound = _factor(V, tolerance=1e-8, rank=3)
    assert entry.rank == 3 and bound == bounds[3] > 1e-8


def test_the_bound_from_an_entry_alone_is_an_upper_bound():
    V = _delta(6.0)
    for k in (1, 5, 20, 36):
        entry, exact = _factor(V, rank=k)
        assert exact <= entry_paper_bound(entry) + 1e-12


def test_a_sketch_has_no_exact_bound_and_tolerance_refuses_it():
    V = _delta(6.0)
    entry, bound = _factor(V, rank=2, method="randomized")
    assert bound is None
    with pytest.raises(AsFTError, match="exact SVD"):
        _factor(V, rank=2, method="randomized", tolerance=0.1)
    entry, bound = _factor(V, rank=2, method="auto", tolerance=0.1)  # auto: exact
    assert bound is not None
    for bad in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(AsFTError, match="tolerance"):
            _factor(V, tolerance=bad)
    with pytest.raises(AsFTError, match="energy or tolerance"):
        _factor(V, tolerance=0.1, energy=0.9)


# ---------------------------------------------------------------- build_anchor and the CLI
NAMES = ("model.layers.0.q_proj", "model.layers.0.v_proj")


@pytest.fixture()
def ckpts(tmp_path):
    """Aligned and base single-file checkpoints of two (20, 30) modules whose deltas have
    spectra 4·0.7^i and 0.5·0.9^i."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    base, aligned = {}, {}
    for name, (scale, decay) in zip(NAMES, ((4.0, 0.7), (0.5, 0.9))):
        Q1, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
        Q2, _ = torch.linalg.qr(torch.randn(30, 20, generator=g, dtype=torch.float64))
        V = (Q1 * (scale * decay ** torch.arange(20, dtype=torch.float64))) @ Q2.T
        W = torch.randn(20, 30, generator=g, dtype=torch.float64)
        base[name + ".weight"], aligned[name + ".weight"] = W, W + V
    for side, state in (("aligned", aligned), ("base", base)):
        (tmp_path / side).mkdir()
        save_file(state, tmp_path / side / "model.safetensors")
    return tmp_path, {n: aligned[n + ".weight"] - base[n + ".weight"] for n in NAMES}


def test_build_anchor_keeps_per_module_the_smallest_k_within_the_tolerance(ckpts, tmp_path):
    root, deltas = ckpts
    anchor = asft.build_anchor(root / "aligned", root / "base", ["q_proj", "v_proj"], rank=None, tolerance=0.05,
                               dtype=torch.float64, progress=False)
    assert anchor.metadata["tolerance"] == 0.05
    ranks = set()
    for name in NAMES:
        expected, bound = _factor(deltas[name], tolerance=0.05)
        info = anchor.metadata["per_module"][name]
        assert anchor[name].rank == expected.rank == info["rank"] and info["paper_bound"] == pytest.approx(bound)
        assert bound <= 0.05
        ranks.add(expected.rank)
    assert len(ranks) == 2  # per module: the two spectra need different k
    path = tmp_path / "tol.safetensors"
    anchor.save(path)
    again = asft.AlignmentAnchor.load(path)
    assert again.metadata["per_module"][NAMES[0]]["paper_bound"] == anchor.metadata["per_module"][NAMES[0]][
        "paper_bound"]
    with pytest.raises(AsFTError, match="exact SVD"):
        asft.build_anchor(root / "aligned", root / "base", ["q_proj"], rank=2, tolerance=0.1, method="randomized",
                          progress=False)
    # a rank that caps k below the tolerance's is named, not silent
    with pytest.warns(UserWarning, match=r"caps k below what tolerance=0.05 needs in 2 module\(s\)"):
        capped = asft.build_anchor(root / "aligned", root / "base", ["q_proj", "v_proj"], rank=1, tolerance=0.05,
                                   progress=False)
    assert all(info["paper_bound"] > 0.05 for info in capped.metadata["per_module"].values())


def test_cli_tolerance_and_inspect_show_the_bound_per_module(ckpts, tmp_path, capsys):
    from asft_kernels.cli import main

    root, deltas = ckpts
    out = tmp_path / "a.safetensors"
    assert main(["build-anchor", "--aligned", str(root / "aligned"), "--base", str(root / "base"), "--targets",
                 "q_proj,v_proj", "--tolerance", "0.01", "--out", str(out), "--no-progress"]) == 0
    assert "--tolerance 0.01: largest dropped weight" in capsys.readouterr().out
    capped = tmp_path / "capped.safetensors"
    assert main(["build-anchor", "--aligned", str(root / "aligned"), "--base", str(root / "base"), "--targets",
                 "q_proj", "--tolerance", "0.01", "--rank", "1", "--out", str(capped), "--no-progress"]) == 0
    said = capsys.readouterr()
    assert "above the tolerance in 1 module(s) where --rank 1 capped k" in said.out and "Warning" not in said.err
    anchor = asft.AlignmentAnchor.load(out)
    assert anchor.metadata["rank"] is None  # --tolerance without --rank: no cap
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tolerance=0.01" in text and "R bound" in text
    for name in NAMES:
        line = next(ln for ln in text.splitlines() if ln.startswith(name))
        assert f"{anchor.metadata['per_module'][name]['paper_bound']:.3g}" in line.split()
        assert float(line.split()[4]) <= 0.01

    # a file written before the bound was stored: loads, and inspect derives an upper bound
    old_meta = {k: v for k, v in anchor.metadata.items() if k != "tolerance"}
    old_meta["per_module"] = {n: {k: v for k, v in info.items() if k != "paper_bound"}
                              for n, info in anchor.metadata["per_module"].items()}
    old = tmp_path / "old.safetensors"
    asft.AlignmentAnchor(dict(anchor.items()), old_meta).save(old)
    loaded = asft.AlignmentAnchor.load(old)
    assert main(["inspect", str(old)]) == 0
    text = capsys.readouterr().out
    assert "derived from the entry" in text
    for name in NAMES:
        cell = next(ln for ln in text.splitlines() if ln.startswith(name)).split()[4]
        stored = anchor.metadata["per_module"][name]["paper_bound"]
        assert cell.endswith("*") and float(cell[:-1]) >= float(f"{stored:.3g}")
        assert float(cell[:-1]) == pytest.approx(entry_paper_bound(loaded[name]), rel=1e-2)
    assert main(["build-anchor", "--aligned", str(root / "aligned"), "--base", str(root / "base"), "--targets",
                 "q_proj", "--tolerance", "0.01", "--energy", "0.9", "--out", str(tmp_path / "b.safetensors"),
                 "--no-progress"]) == 1
    assert "energy or tolerance" in capsys.readouterr().err
