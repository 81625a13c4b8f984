"""AlignmentAnchor: decomposition, file format, binding to PEFT models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import lora, tiny_llama
from helpers import odd_anchor, odd_lora, random_deltas
from torch import nn

import asft_kernels as asft
from asft_kernels.anchor import factorize_delta, normalize_module_name
from asft_kernels.reference import dense_projection, pair_regularizer, published_projection


def test_full_rank_anchor_reproduces_published_projection():
    g = torch.Generator().manual_seed(0)
    V = torch.randn(37, 123, generator=g, dtype=torch.float64)
    anchor = asft.AlignmentAnchor.from_deltas({"layer": V}, dtype=torch.float64)
    entry = anchor["layer"]
    assert entry.rank == 37 and entry.energy == pytest.approx(1.0)
    U, c = entry.U, entry.coefficients("paper")
    torch.testing.assert_close((U * c) @ U.T, published_projection(V), rtol=1e-12, atol=1e-12)


def test_low_rank_delta_numerical_rank_and_truncation():
    g = torch.Generator().manual_seed(1)
    V = torch.randn(50, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 40, generator=g, dtype=torch.float64)
    assert asft.AlignmentAnchor.from_deltas({"x": V}, dtype=torch.float64)["x"].rank == 3
    assert asft.AlignmentAnchor.from_deltas({"x": V}, rank=2, dtype=torch.float64)["x"].rank == 2


def test_energy_picks_smallest_rank():
    s = torch.tensor([10.0, 5.0, 1.0, 0.5], dtype=torch.float64)
    Q1, _ = torch.linalg.qr(torch.randn(20, 4, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(30, 4, dtype=torch.float64))
    V = (Q1 * s) @ Q2.T
    total = float((s * s).sum())
    entry = factorize_delta(V, energy=0.995, dtype=torch.float64)
    assert entry.rank == 3  # s² = 100, 25, 1, .25: 125 < 0.995·126.25 ≤ 126
    assert entry.energy == pytest.approx(126.0 / total)


def test_randomized_svd_matches_exact_on_low_rank_delta():
    g = torch.Generator().manual_seed(2)
    V = torch.randn(300, 8, generator=g) @ torch.randn(8, 200, generator=g)
    exact = factorize_delta(V, rank=8, method="exact")
    rand = factorize_delta(V, rank=8, method="randomized")
    torch.testing.assert_close(rand.s, exact.s, rtol=1e-4, atol=1e-4)
    P1, P2 = exact.U @ exact.U.T, rand.U @ rand.U.T
    assert float((P1 - P2).abs().max()) < 1e-4


def test_modes_coefficients():
    anchor = odd_anchor(rank=4)
    e = anchor["up"]
    assert torch.equal(e.coefficients("projector"), torch.ones(4, dtype=e.s.dtype))
    assert torch.equal(e.coefficients("full"), torch.zeros(4, dtype=e.s.dtype))
    torch.testing.assert_close(e.coefficients("paper"), e.s**2 / e.fro_norm)
    with pytest.raises(asft.AsFTError, match="mode"):
        e.coefficients("nope")


def test_save_load_round_trip(tmp_path):
    anchor = odd_anchor(rank=3)
    path = tmp_path / "a.anchor.safetensors"
    anchor.save(path)
    loaded = asft.AlignmentAnchor.load(path)
    assert set(loaded) == set(anchor)
    for k in anchor:
        assert torch.equal(loaded[k].U, anchor[k].U) and torch.equal(loaded[k].s, anchor[k].s)
        assert loaded[k].fro_norm == anchor[k].fro_norm and loaded[k].shape == anchor[k].shape
    assert loaded.metadata["built_by"] == "from_deltas"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_save_failure_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    anchor = odd_anchor(rank=3)

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        anchor.save(tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == []


def test_load_rejects_bad_files(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(asft.AnchorFileError, match="does not exist"):
        asft.AlignmentAnchor.load(tmp_path / "missing.safetensors")
    anchor = odd_anchor(rank=3)
    good = tmp_path / "good.safetensors"
    anchor.save(good)
    data = good.read_bytes()
    # truncated
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(asft.AnchorFileError, match="trunc.safetensors"):
        asft.AlignmentAnchor.load(tmp_path / "trunc.safetensors")
    # garbage
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(asft.AnchorFileError):
        asft.AlignmentAnchor.load(tmp_path / "junk.safetensors")
    # NaN in a basis
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(good)
    tensors["up::U"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors", metadata=meta)
    with pytest.raises(asft.AnchorFileError, match="NaN"):
        asft.AlignmentAnchor.load(tmp_path / "nan.safetensors")
    # wrong format version
    bad_meta = json.loads(meta["asft_anchor"])
    bad_meta["format_version"] = 99
    save_file(load_file(good), tmp_path / "v99.safetensors", metadata={"asft_anchor": json.dumps(bad_meta)})
    with pytest.raises(asft.AnchorFileError, match="format version"):
        asft.AlignmentAnchor.load(tmp_path / "v99.safetensors")
    # no metadata
    save_file(load_file(good), tmp_path / "nometa.safetensors")
    with pytest.raises(asft.AnchorFileError, match="metadata"):
        asft.AlignmentAnchor.load(tmp_path / "nometa.safetensors")
    # inconsistent shape
    tensors = load_file(good)
    tensors["up::U"] = tensors["up::U"][:, :2].contiguous()
    save_file(tensors, tmp_path / "shape.safetensors", metadata=meta)
    with pytest.raises(asft.AnchorFileError, match="'up'"):
        asft.AlignmentAnchor.load(tmp_path / "shape.safetensors")


def test_from_deltas_rejects_bad_input():
    with pytest.raises(asft.AnchorMismatchError, match="layer.*NaN"):
        asft.AlignmentAnchor.from_deltas({"layer": torch.tensor([[1.0, float("nan")]])})
    with pytest.raises(asft.AnchorMismatchError, match="2-D"):
        asft.AlignmentAnchor.from_deltas({"layer": torch.ones(3)})
    with pytest.raises(asft.AsFTError, match="rank"):
        asft.AlignmentAnchor.from_deltas({"layer": torch.ones(3, 3)}, rank=0)
    with pytest.raises(asft.AnchorMismatchError):
        asft.AlignmentAnchor.from_deltas({})


@pytest.mark.parametrize("name,expected", [
    ("base_model.model.model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"),
    ("module.base_model.model.model.layers.0.q_proj", "model.layers.0.q_proj"),
    ("_orig_mod.base_model.model.h.0.attn.c_attn", "h.0.attn.c_attn"),
    ("model.layers.0._fsdp_wrapped_module.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj"),
])
def test_normalize_module_name(name, expected):
    assert normalize_module_name(name) == expected


class _Wrapper(nn.Module):
    def __init__(self, attr, inner):
        super().__init__()
        setattr(self, attr, inner)


@pytest.mark.parametrize("attr", ["module", "_orig_mod"])
def test_bind_through_wrappers(attr):
    anchor = odd_anchor(rank=3)
    model = odd_lora(r=2)
    wrapped = _Wrapper(attr, model)
    b = anchor.bind(wrapped)
    assert sorted(p.key for p in b) == ["down", "out", "up"]


def test_bind_rank_pattern_per_module_ranks():
    anchor = odd_anchor(rank=3)
    model = odd_lora(r=2, rank_pattern={"up": 5})
    b = anchor.bind(model)
    assert b["up"].A.shape[0] == 5 and b["down"].A.shape[0] == 2


def test_bind_shape_mismatch_names_module_and_shapes():
    g = torch.Generator().manual_seed(0)
    anchor = asft.AlignmentAnchor.from_deltas(
        {"up": torch.randn(37, 120, generator=g), "down": torch.randn(1, 37, generator=g),
         "out": torch.randn(123, 1, generator=g)})
    with pytest.raises(asft.AnchorMismatchError, match=r"up.*\(37, 120\).*\(37, 123\)"):
        anchor.bind(odd_lora(r=2))


def test_bind_missing_module_strict_and_lenient():
    deltas = random_deltas(tiny_llama(), {"model.layers.0.self_attn.q_proj"})
    anchor = asft.AlignmentAnchor.from_deltas(deltas, rank=2)
    model = lora(tiny_llama())
    with pytest.raises(asft.AnchorMismatchError, match="without an anchor entry"):
        anchor.bind(model)
    b = anchor.bind(model, strict=False)
    assert [p.key for p in b] == ["model.layers.0.self_attn.q_proj"]
    assert len(b.unanchored) == 3


def test_bind_requires_lora_model():
    with pytest.raises(asft.AnchorMismatchError, match="no LoRA modules"):
        odd_anchor(rank=2).bind(nn.Linear(3, 3))


def test_bind_refuses_dora():
    anchor = odd_anchor(rank=2)
    with pytest.raises(asft.UnsupportedAdapterError, match="DoRA"):
        anchor.bind(_dora_model())


def _dora_model():
    from helpers import OddNet
    from peft import LoraConfig, get_peft_model

    return get_peft_model(OddNet().double(), LoraConfig(r=2, target_modules=["up", "down", "out"], use_dora=True))


def test_bind_refuses_pissa():
    from helpers import OddNet
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(OddNet(), LoraConfig(r=2, target_modules=["up"], init_lora_weights="pissa"))
    with pytest.raises(asft.UnsupportedAdapterError, match="pissa"):
        odd_anchor(rank=2).bind(model)


def test_bind_unknown_mode():
    with pytest.raises(asft.AsFTError, match="mode"):
        odd_anchor(rank=2).bind(odd_lora(r=2), mode="safe")


def test_reference_dense_projection_matches_anchor_modes():
    anchor = odd_anchor(rank=4)
    model = odd_lora(r=2)
    for mode in ("paper", "projector", "full"):
        pair = anchor.bind(model, mode=mode)["up"]
        C = dense_projection(pair)
        B, A = pair.B, pair.A
        expected = ((torch.eye(37, dtype=torch.float64) - C) @ B @ A).pow(2).sum()
        assert float(pair_regularizer(pair).detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
        if mode == "projector":
            torch.testing.assert_close(C @ C, C)
