"""LoRA on layers other than nn.Linear: an embedding is anchored with the layout PEFT
uses, a parametrized factor is refused; neither is ever skipped silently."""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_err, trainable
from torch import nn

import asft_kernels as asft
from asft_kernels.reference import paper_regularizer, published_projection

NUM, DIM, OUT = 11, 6, 5  # num_embeddings, embedding_dim, output features


class EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(NUM, DIM)
        self.lin = nn.Linear(DIM, OUT)

    def forward(self, ids):
        return self.lin(torch.tanh(self.emb(ids)))


def emb_lora(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = EmbNet().double()
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "lin"], init_lora_weights=False)
    return get_peft_model(net, cfg)


def emb_deltas(transpose=True):
    """V per module in the anchor's out × in layout: for the embedding (W_aligned − W_base)ᵀ,
    embedding_dim × num_embeddings (``transpose=False``: the weight's own layout, wrong)."""
    g = torch.Generator().manual_seed(7)
    v_emb = torch.randn(NUM, DIM, generator=g, dtype=torch.float64)  # a delta of the (NUM, DIM) weight
    v_lin = torch.randn(OUT, DIM, generator=g, dtype=torch.float64)
    return {"emb": v_emb.T if transpose else v_emb, "lin": v_lin}, v_emb


def emb_task_loss(model, step):
    g = torch.Generator().manual_seed(50 + step)
    ids = torch.randint(0, NUM, (4, 3), generator=g)
    y = torch.randn(4, 3, OUT, generator=g, dtype=torch.float64)
    return (model(ids) - y).pow(2).mean()


def test_embedding_lora_is_bound_with_the_transposed_delta():
    deltas, v_emb = emb_deltas()
    anchor = asft.AlignmentAnchor.from_deltas(deltas, dtype=torch.float64)
    model = emb_lora()
    binding = anchor.bind(model, strict=True)
    assert sorted(p.key for p in binding) == ["emb", "lin"]
    pair = binding["emb"]
    module = pair.module
    assert pair.embedding
    assert pair.A is module.lora_embedding_A["default"] and pair.B is module.lora_embedding_B["default"]
    # PEFT's delta of the embedding weight is (B A)ᵀ · scaling
    scaling = module.scaling["default"]
    torch.testing.assert_close((pair.B @ pair.A).T * scaling, module.get_delta_weight("default"), rtol=0, atol=1e-12)
    # R of the pair is the published formula on the delta in the out × in layout: ΔWᵀ against Vᵀ
    delta_t = module.get_delta_weight("default").T / scaling
    C = published_projection(v_emb.T)
    expected = ((torch.eye(DIM, dtype=torch.float64) - C) @ delta_t).pow(2).sum()
    only_emb = asft.AlignmentAnchor.from_deltas({"emb": v_emb.T}, dtype=torch.float64)
    r = paper_regularizer(only_emb.bind(model, strict=False), 1.0)
    assert float(r.detach()) == pytest.approx(float(expected), rel=1e-10)


def test_embedding_anchor_in_the_weights_layout_is_refused_naming_the_layout():
    deltas, _ = emb_deltas(transpose=False)
    anchor = asft.AlignmentAnchor.from_deltas(deltas, dtype=torch.float64)
    with pytest.raises(asft.AnchorMismatchError, match=r"emb.*\(6, 11\).*Embedding.*embedding_dim × num_embeddings"):
        anchor.bind(emb_lora())


def test_embedding_lora_trajectory_matches_adamw_on_task_plus_r(backend):
    deltas, _ = emb_deltas()
    anchor = asft.AlignmentAnchor.from_deltas(deltas, dtype=torch.float64)
    m1, m2 = emb_lora(), emb_lora()
    o1 = asft.AsFTAdamW(trainable(m1), lr=1e-2, anchor=anchor.bind(m1), anchor_lambda=0.7, backend=backend)
    o2 = torch.optim.AdamW(trainable(m2), lr=1e-2)
    b2 = anchor.bind(m2)
    start = m1.base_model.model.emb.lora_embedding_B["default"].detach().clone()
    for s in range(5):
        o1.zero_grad()
        o2.zero_grad()
        emb_task_loss(m1, s).backward()
        (emb_task_loss(m2, s) + paper_regularizer(b2, 0.7)).backward()
        o1.step()
        o2.step()
    assert len(o1.param_groups[0]["anchor_pairs"]) == 2
    assert not torch.equal(start, m1.base_model.model.emb.lora_embedding_B["default"])
    assert max_rel_err(trainable(m1), trainable(m2)) < 1e-10


class _Double(nn.Module):
    def forward(self, x):
        return 2 * x


@pytest.mark.parametrize("factors", [("lora_A",), ("lora_B",), ("lora_A", "lora_B")])
@pytest.mark.parametrize("when", ["before_bind", "after_bind"])
def test_parametrized_lora_factor_is_refused_never_dropped(factors, when):
    """A factor registered with torch.nn.utils.parametrize: its parameter is not the A/B of
    ΔW = B A, so bind (UnsupportedAdapterError) or the optimizer (OptimizerInputError)
    refuses it, naming module and factor; both factors parametrized used to be dropped from
    the anchored pairs without a word."""
    from helpers import odd_anchor, odd_lora
    from torch.nn.utils import parametrize

    model = odd_lora(r=2)
    anchor = odd_anchor(rank=3)
    binding = anchor.bind(model) if when == "after_bind" else None
    up = model.base_model.model.up
    for name in factors:
        parametrize.register_parametrization(getattr(up, name)["default"], "weight", _Double())
    pattern = r"base_model\.model\.up: " + "/".join(factors) + r" is parametrized"
    if binding is None:
        with pytest.raises(asft.UnsupportedAdapterError, match=pattern):
            anchor.bind(model)
        return
    with pytest.raises(asft.OptimizerInputError, match=pattern):
        asft.AsFTAdamW(trainable(model), lr=1e-2, anchor=binding)


def test_parametrized_embedding_factor_is_refused():
    from torch.nn.utils import parametrize

    deltas, _ = emb_deltas()
    anchor = asft.AlignmentAnchor.from_deltas(deltas, dtype=torch.float64)
    model = emb_lora()
    parametrize.register_parametrization(model.base_model.model.emb.lora_embedding_B, "default", _Double())
    with pytest.raises(asft.UnsupportedAdapterError, match=r"emb: lora_B is parametrized"):
        anchor.bind(model)


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_factor_parametrized_after_the_optimizer_is_built_is_refused_at_the_next_step(factor, backend):
    """A parametrization registered after construction (and after steps): the next step
    refuses it, naming module and factor, and writes nothing; it used to anchor the
    parametrization's underlying tensor while the forward used another."""
    from helpers import odd_anchor, odd_lora, odd_task_loss
    from torch.nn.utils import parametrize

    model = odd_lora(r=2)
    opt = asft.AsFTAdamW(trainable(model), lr=1e-2, anchor=odd_anchor(rank=3).bind(model), backend=backend)
    odd_task_loss(model, 0, torch.float64).backward()
    opt.step()
    up = model.base_model.model.up
    parametrize.register_parametrization(getattr(up, factor)["default"], "weight", _Double())
    odd_task_loss(model, 1, torch.float64).backward()
    before = [p.detach().clone() for p in trainable(model)]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in trainable(model) if p in opt.state]
    with pytest.raises(asft.OptimizerInputError, match=r"base_model\.model\.up: " + factor + " is parametrized"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(trainable(model), before))
    after = [opt.state[p] for p in trainable(model) if p in opt.state]
    assert all(torch.equal(s[k], t[k]) for s, t in zip(after, state) for k in s)
