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


# --- file validation, reproducibility, file modes --------------------------------------------


def _rewrite(src, dst, meta_edit=None, tensor_edit=None, raw_meta=None):
    """Copy anchor file ``src`` to ``dst`` with its metadata and tensors edited."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["asft_anchor"])
    tensors = load_file(src)
    if meta_edit is not None:
        meta_edit(meta)
    if tensor_edit is not None:
        tensor_edit(tensors)
    save_file(tensors, str(dst), metadata={"asft_anchor": raw_meta if raw_meta is not None else json.dumps(meta)})
    return dst


def _set(path, value):
    def edit(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


MALFORMED = {
    "modules-list": (_set(["modules"], ["up", "down"]), "'modules'"),
    "modules-empty": (_set(["modules"], {}), "no modules"),
    "no-version": (lambda m: m.pop("format_version"), "'format_version'"),
    "version-string": (_set(["format_version"], "1"), "'format_version'"),
    "no-shape": (lambda m: m["modules"]["up"].pop("shape"), r"modules\['up'\]\.shape"),
    "shape-3-ints": (_set(["modules", "up", "shape"], [37, 123, 1]), r"modules\['up'\]\.shape"),
    "shape-zero": (_set(["modules", "up", "shape"], [0, 123]), r"modules\['up'\]\.shape"),
    "shape-negative": (_set(["modules", "up", "shape"], [37, -123]), r"modules\['up'\]\.shape"),
    "shape-floats": (_set(["modules", "up", "shape"], [37.0, 123]), r"modules\['up'\]\.shape"),
    "rank-string": (_set(["modules", "up", "rank"], "3"), r"modules\['up'\]\.rank"),
    "energy-string": (_set(["modules", "up", "energy"], "0.9"), r"modules\['up'\]\.energy"),
    "energy-above-one": (_set(["modules", "up", "energy"], 7.0), "'up'.*energy"),
    "module-not-object": (_set(["modules", "up"], [37, 123]), r"modules\['up'\]"),
    "build-list": (_set(["build"], [1, 2]), "'build'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_load_malformed_metadata_names_file_and_field(tmp_path, case):
    good = tmp_path / "good.safetensors"
    odd_anchor(rank=3).save(good)
    edit, field = MALFORMED[case]
    bad = _rewrite(good, tmp_path / f"bad-{case}.safetensors", meta_edit=edit)
    with pytest.raises(asft.AnchorFileError, match=field) as info:
        asft.AlignmentAnchor.load(bad)
    assert f"bad-{case}.safetensors" in str(info.value)


@pytest.mark.parametrize("raw,field", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format_version": 1, "modules": {"up": {"shape": [37, 123], "rank": 3, "energy": NaN}}}', "NaN"),
    ("[1, 2]", "JSON object"),
    ("{not json", "not valid JSON"),
], ids=["deeply-nested", "nan-token", "not-object", "not-json"])
def test_load_malformed_json_is_a_file_error(tmp_path, raw, field):
    good = tmp_path / "good.safetensors"
    odd_anchor(rank=3).save(good)
    bad = _rewrite(good, tmp_path / "bad.safetensors", raw_meta=raw)
    with pytest.raises(asft.AnchorFileError, match=field) as info:
        asft.AlignmentAnchor.load(bad)
    assert "bad.safetensors" in str(info.value)


def test_load_refuses_inconsistent_values(tmp_path):
    good = tmp_path / "good.safetensors"
    odd_anchor(rank=3).save(good)

    def singular_values(t):  # Σ s² = 10010 with ‖V‖_F = 1: cᵢ would be 10⁴
        t["up::s"] = torch.tensor([1.0, 100.0, 3.0], dtype=t["up::s"].dtype)
        t["up::fro"] = torch.tensor([1.0], dtype=torch.float64)

    cases = {
        "sigma": (singular_values, r"'up'.*Σ sᵢ² = 10010 exceeds ‖V‖²_F = 1"),
        "fro-inf": (lambda t: t.__setitem__("up::fro", torch.tensor([float("inf")], dtype=torch.float64)),
                    r"'up'.*up::fro.*NaN or inf"),
        "fro-zero": (lambda t: t.__setitem__("up::fro", torch.tensor([0.0], dtype=torch.float64)), r"'up'.*> 0"),
        "s-inf": (lambda t: t["up::s"].__setitem__(0, float("inf")), r"'up'.*up::s.*NaN or inf"),
        "not-orthonormal": (lambda t: t["up::U"].mul_(1.5), r"'up'.*not orthonormal"),
        "stray-tensor": (lambda t: t.__setitem__("gone::U", torch.ones(2, 2)), "gone::U"),
    }
    for case, (edit, pattern) in cases.items():
        bad = _rewrite(good, tmp_path / f"{case}.safetensors", tensor_edit=edit)
        with pytest.raises(asft.AnchorFileError, match=pattern) as info:
            asft.AlignmentAnchor.load(bad)
        assert f"{case}.safetensors" in str(info.value), case
    with pytest.raises(asft.AnchorFileError, match="is a directory"):
        asft.AlignmentAnchor.load(tmp_path)


def test_hand_built_entry_is_checked_at_construction():
    from asft_kernels.anchor import AnchorEntry
    from asft_kernels.errors import AnchorEntryError

    Q = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))[0]
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    good = dict(U=Q, s=s, fro_norm=4.0, shape=(6, 5), energy=14 / 16)
    AnchorEntry(**good)
    AnchorEntry(**{**good, "U": Q.float(), "s": s.float()})  # float32 round-off is within tolerance
    bad = {
        "k > m": ({"U": torch.eye(3, dtype=torch.float64)[:, :3].repeat(1, 2)[:3], "shape": (3, 5),
                   "s": torch.ones(6, dtype=torch.float64)}, "k = 6 > m = 3"),
        "not orthonormal": ({"U": Q * 1.01}, "not orthonormal"),
        "float32 not orthonormal": ({"U": (Q * (1 + 1e-4)).float(), "s": s.float()}, "not orthonormal"),
        "s too large": ({"fro_norm": 1.0}, "exceeds"),
        "zero norm": ({"fro_norm": 0.0}, "> 0"),
        "shape": ({"shape": (6, 0)}, "positive ints"),
        "dtype": ({"U": Q.half(), "s": s.half()}, "float32 or both float64"),
        "mixed dtype": ({"s": s.float()}, "float32 or both float64"),
        "nan": ({"s": torch.tensor([3.0, float("nan"), 1.0], dtype=torch.float64)}, "NaN"),
        "energy": ({"energy": float("nan")}, "energy"),
    }
    for case, (change, pattern) in bad.items():
        with pytest.raises(AnchorEntryError, match=pattern):
            AnchorEntry(**{**good, **change})
        assert issubclass(AnchorEntryError, asft.AsFTError), case


def test_from_deltas_never_stores_non_finite_values(tmp_path):
    huge = torch.full((4, 3), 3e38)  # finite in float32, but its singular value is not
    with pytest.raises(asft.AnchorMismatchError, match="layer.*float64"):
        asft.AlignmentAnchor.from_deltas({"layer": huge})
    anchor = asft.AlignmentAnchor.from_deltas({"layer": huge}, dtype=torch.float64)
    assert bool(torch.isfinite(anchor["layer"].s).all())
    anchor.save(tmp_path / "huge.safetensors")
    loaded = asft.AlignmentAnchor.load(tmp_path / "huge.safetensors")
    assert torch.equal(loaded["layer"].s, anchor["layer"].s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_deltas_and_load_agree_on_dtypes(dtype):
    # load reads float32/float64 bases only; from_deltas refuses to make anything else
    with pytest.raises(asft.AsFTError, match="float32 or torch.float64"):
        asft.AlignmentAnchor.from_deltas({"layer": torch.randn(5, 4)}, dtype=dtype)


def test_unchanged_module_is_refused_unless_skipped():
    deltas = {"a": torch.randn(5, 4), "b": torch.zeros(5, 4), "c": torch.zeros(3, 2)}
    with pytest.raises(asft.AnchorMismatchError, match=r"unchanged.*\['b', 'c'\].*skip_unchanged=True"):
        asft.AlignmentAnchor.from_deltas(deltas)
    anchor = asft.AlignmentAnchor.from_deltas(deltas, skip_unchanged=True)
    assert list(anchor) == ["a"] and anchor.metadata["skipped_unchanged"] == ["b", "c"]
    with pytest.raises(asft.AnchorMismatchError, match="zero"):
        asft.AlignmentAnchor.from_deltas({"b": torch.zeros(5, 4)}, skip_unchanged=True)
    with pytest.raises(asft.AnchorMismatchError, match="zero"):
        factorize_delta(torch.zeros(5, 4))


def test_randomized_svd_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    g = torch.Generator().manual_seed(3)
    V = torch.randn(200, 6, generator=g) @ torch.randn(6, 150, generator=g) + 0.1 * torch.randn(200, 150, generator=g)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = asft.AlignmentAnchor.from_deltas({"x": V}, rank=4, method="randomized")
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)  # another global RNG state: same result
    second = asft.AlignmentAnchor.from_deltas({"x": V}, rank=4, method="randomized")
    assert torch.equal(first["x"].U, second["x"].U) and torch.equal(first["x"].s, second["x"].s)
    first.save(tmp_path / "1.safetensors")
    second.save(tmp_path / "2.safetensors")
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()
    other = asft.AlignmentAnchor.from_deltas({"x": V}, rank=4, method="randomized", oversample=0, niter=0, seed=7)
    assert not torch.equal(other["x"].U, first["x"].U)
    meta = asft.AlignmentAnchor.load(tmp_path / "1.safetensors").metadata
    assert meta["seed"] == 0 and meta["method"] == "randomized" and meta["per_module"]["x"]["method"] == "randomized"
    with pytest.raises(asft.AsFTError, match="seed"):
        factorize_delta(V, rank=4, seed=-1)
    with pytest.raises(asft.AsFTError, match="oversample"):
        factorize_delta(V, rank=4, oversample=-5)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_usual_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        odd_anchor(rank=2).save(tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_temp_file_of_a_killed_save_is_named_and_removed_by_the_next_save(tmp_path):
    from asft_kernels.anchor import atomic_write

    target = tmp_path / "a.safetensors"
    pid = os.fork()
    if pid == 0:  # child: dies in the middle of writing, like kill -9 (no cleanup runs)
        def die(tmp):
            tmp.write_bytes(b"partial")
            os._exit(0)
        try:
            atomic_write(target, die)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".a.safetensors.asft-tmp.") and f".{pid}." in left[0]
    keep = tmp_path / f".a.safetensors.asft-tmp.otherhost.{pid}.00000000"  # another host's, recent: kept
    keep.write_bytes(b"x")
    unrelated = tmp_path / f".b.safetensors.asft-tmp.{left[0].split('.')[4]}.{pid}.00000000"
    unrelated.write_bytes(b"x")
    odd_anchor(rank=2).save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.safetensors", keep.name, unrelated.name])
    asft.AlignmentAnchor.load(target)
