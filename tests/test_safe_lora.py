"""Safe LoRA projection through the anchor's low-rank form vs a dense implementation of
the published algorithm (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import lora, tiny_llama

from asft_kernels import AlignmentAnchor, safe_lora_project
from asft_kernels.errors import AnchorMismatchError, AsFTError

TARGETS = ("q_proj", "v_proj")


def _deltas(model, rank: int | None, seed: int = 3) -> dict[str, torch.Tensor]:
    """Alignment deltas for every target module; low rank unless ``rank`` is None."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in TARGETS:
            m, n = module.weight.shape
            if rank is None:
                V = torch.randn(m, n, generator=gen, dtype=torch.float64)
            else:
                V = torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(
                    rank, n, generator=gen, dtype=torch.float64)
            deltas[name] = 0.05 * V
    return deltas


def _setup(rank: int | None):
    base = tiny_llama(torch.float64)
    deltas = _deltas(base, rank)
    model = lora(base, r=3, targets=TARGETS)
    anchor = AlignmentAnchor.from_deltas(deltas, rank=None, dtype=torch.float64)
    pairs = list(anchor.bind(model))
    # Rotate part of each B into span(V) by a different amount per layer, so the layer
    # similarities spread out and a threshold splits them.
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            V = deltas[pair.key]
            Uv = torch.linalg.svd(V, full_matrices=False)[0][:, : (rank or 4)]
            mix = (i + 1) / (len(pairs) + 1)
            pair.B.copy_((1 - mix) * pair.B + mix * 3.0 * Uv @ (Uv.T @ pair.B))
    return model, anchor, deltas, pairs


def dense_safe_lora(deltas, factors, threshold=None, num_layers=None):
    """The published algorithm, densely: C = V Vᵀ/‖V‖_F (m × m), cosine of the flattened
    C·B·A and B·A, B ← C·B where the cosine is at most the threshold."""
    cos, proj = {}, {}
    for key, (B, A) in factors.items():
        V = deltas[key]
        C = V @ V.T / torch.linalg.matrix_norm(V)
        cos[key] = torch.nn.functional.cosine_similarity((C @ B @ A).reshape(1, -1), (B @ A).reshape(1, -1)).item()
        proj[key] = C @ B
    thr = threshold if threshold is not None else sorted(cos.values())[num_layers - 1]
    new_B = {k: (proj[k] if cos[k] <= thr else factors[k][0]) for k in factors}
    return cos, new_B, thr


@pytest.mark.parametrize("delta_rank", [2, None], ids=["lowrank-V", "fullrank-V"])
@pytest.mark.parametrize("select", ["threshold", "num_layers"])
def test_matches_dense_published_algorithm(delta_rank, select):
    model, anchor, deltas, pairs = _setup(delta_rank)
    factors = {p.key: (p.B.detach().clone(), p.A.detach().clone()) for p in pairs}
    if select == "threshold":
        cos_ref, _, _ = dense_safe_lora(deltas, factors, num_layers=1)
        ordered = sorted(cos_ref.values())
        kwargs = {"threshold": 0.5 * (ordered[1] + ordered[2])}  # between the 2nd and 3rd lowest
    else:
        kwargs = {"num_layers": 2}
    cos_ref, B_ref, thr_ref = dense_safe_lora(deltas, factors, **kwargs)
    result = safe_lora_project(model, anchor, **kwargs)

    assert result.threshold == pytest.approx(thr_ref, rel=1e-12)
    assert sorted(result.projected) == sorted(k for k in cos_ref if cos_ref[k] <= thr_ref)
    assert 0 < len(result.projected) < len(pairs)
    worst_B = worst_cos = 0.0
    for p in pairs:
        assert result.similarity[p.key] == pytest.approx(cos_ref[p.key], abs=1e-12)
        ref = B_ref[p.key]
        rel = float((p.B.detach() - ref).abs().max() / ref.abs().max())
        assert rel < 1e-12, (p.key, rel)
        assert torch.equal(p.A.detach(), factors[p.key][1])  # A is never touched
        worst_B = max(worst_B, rel)
        worst_cos = max(worst_cos, abs(result.similarity[p.key] - cos_ref[p.key]))
    # shown with `pytest -s`: the figures quoted for this check
    print(f"\nsafe_lora vs dense ({delta_rank=}, {select}): max rel err of B {worst_B:.2e}, "
          f"max abs err of cosine {worst_cos:.2e}, projected {len(result.projected)}/{len(pairs)}")


def test_projector_mode_leaves_no_orthogonal_residual():
    from asft_kernels.diagnostics import alignment_report

    model, anchor, _, _ = _setup(2)
    result = safe_lora_project(model, anchor, threshold=2.0, mode="projector")  # every layer
    rows = {r.key: r for r in alignment_report(model, anchor, mode="projector")}
    assert sorted(result.projected) == sorted(rows)
    for row in rows.values():
        assert row.residual_fraction < 1e-10
        assert row.subspace_cosine == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one"),
    ({"threshold": 0.1, "num_layers": 1}, "exactly one"),
    ({"num_layers": 0}, "num_layers"),
    ({"threshold": float("nan")}, "threshold"),
    ({"threshold": 0.1, "mode": "full"}, "full"),
])
def test_bad_arguments_change_nothing(kwargs, match):
    model, anchor, _, pairs = _setup(2)
    before = [p.B.detach().clone() for p in pairs]
    with pytest.raises(AsFTError, match=match):
        safe_lora_project(model, anchor, **kwargs)
    assert all(torch.equal(p.B.detach(), b) for p, b in zip(pairs, before))


def test_mismatched_anchor_names_the_module():
    model, _, deltas, pairs = _setup(2)
    key = pairs[0].key
    wrong = dict(deltas)
    wrong[key] = torch.randn(7, deltas[key].shape[1], dtype=torch.float64)
    with pytest.raises(AnchorMismatchError, match="q_proj"):
        safe_lora_project(model, AlignmentAnchor.from_deltas(wrong, dtype=torch.float64), threshold=0.5)
