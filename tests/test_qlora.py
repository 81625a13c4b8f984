"""QLoRA: LoRA over a bitsandbytes-quantized base (4-bit NF4 / FP4, 8-bit), on CPU.

The anchor is built from the full-precision checkpoints; the quantized model is only the
fine-tuning base. A 4-bit weight is stored packed ((m·n/2, 1) uint8), so binding must
read the layer's logical (m, n) shape, and the regularizer must equal the published
formula ``λ Σ ‖(I − V Vᵀ/‖V‖_F) B A‖²_F`` with ``V`` the full-precision delta of the
dequantized (m, n) layer.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_llama

from asft_kernels import AsFTAdamW
from asft_kernels.build import build_anchor
from asft_kernels.reference import paper_regularizer, published_projection

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

# non-square layers (q 64×64, v 32×64, gate 128×64, down 64×128) so a transposed shape cannot pass;
# bitsandbytes' CPU 4-bit matmul needs in_features to be a multiple of its block size (64)
TARGETS = ("q_proj", "v_proj", "gate_proj", "down_proj")
LAM = 0.7
QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Full-precision base and aligned checkpoints (aligned = base + rank-3 deltas on the
    targets), the anchor built from them, the deltas ``V`` (m, n) in float64 and the
    aligned target weights (m, n)."""
    root = tmp_path_factory.mktemp("qlora")
    base = tiny_llama(torch.float32, layers=1, hidden=64, inter=128)
    aligned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(3)
    deltas, weights = {}, {}
    with torch.no_grad():
        for name, module in aligned.named_modules():
            if name.split(".")[-1] in TARGETS:
                m, n = module.weight.shape
                V = 0.05 * torch.randn(m, 3, generator=gen) @ torch.randn(3, n, generator=gen)
                module.weight += V
                deltas[name] = module.weight.double() - base.get_submodule(name).weight.double()
                weights[name] = module.weight.detach().clone()
    base.save_pretrained(root / "base")
    aligned.save_pretrained(root / "aligned")
    anchor = build_anchor(str(root / "aligned"), str(root / "base"), list(TARGETS), rank=None, progress=False)
    return root, anchor, deltas, weights


def _quantized_lora(root, quant: str):
    """The aligned checkpoint loaded quantized on CPU, with LoRA (B ≠ 0) on the targets."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            root / "aligned", quantization_config=BitsAndBytesConfig(**QUANT[quant]), device_map="cpu",
            dtype=torch.float32)
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False, lora_dropout=0.0)
    return get_peft_model(model, cfg)


def _dequantized(base_layer) -> torch.Tensor:
    """The (m, n) weight the quantized layer computes with."""
    w = base_layer.weight
    if isinstance(w, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return w.data.float() * w.SCB.float()[:, None] / 127  # Int8Params: row-wise absmax scale


def _published(model, deltas) -> torch.Tensor:
    """``λ Σ ‖(I − V Vᵀ/‖V‖_F) B A‖²_F`` (float64) from the full-precision deltas."""
    total = torch.zeros((), dtype=torch.float64)
    for name, V in deltas.items():
        module = model.base_model.model.get_submodule(name)
        A = module.lora_A["default"].weight.detach().double()
        B = module.lora_B["default"].weight.detach().double()
        residual = (torch.eye(V.shape[0], dtype=torch.float64) - published_projection(V)) @ (B @ A)
        total += residual.pow(2).sum()
    return LAM * total


def _loss(model, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_bind_over_a_quantized_base(checkpoints, quant):
    root, anchor, deltas, weights = checkpoints
    model = _quantized_lora(root, quant)
    for name, weight in weights.items():
        base_layer = model.base_model.model.get_submodule(name).get_base_layer()
        dense = _dequantized(base_layer).float()
        assert tuple(dense.shape) == tuple(weight.shape) == tuple(deltas[name].shape)
        # the quantized base is the aligned model up to the quantization error
        assert torch.linalg.matrix_norm(dense - weight) < 0.15 * torch.linalg.matrix_norm(weight), name
    # bitsandbytes may repack a 4-bit weight for CPU inference ((m, n/2) uint8) at the first
    # eval-mode forward without gradients: binding must read (m, n) in either layout
    model.eval()
    for forward_first in (False, True):
        if forward_first:
            with torch.no_grad():
                _loss(model, 99)
        binding = anchor.bind(model)
        assert sorted(p.key for p in binding) == sorted(deltas)
        for pair in binding:
            assert tuple(pair.entry.shape) == tuple(deltas[pair.key].shape)
            stored = pair.module.get_base_layer().weight
            if quant != "int8":  # the 4-bit weight is packed: its stored shape is not (m, n)
                assert tuple(stored.shape) != tuple(pair.entry.shape) and stored.dtype == torch.uint8
            else:
                assert tuple(stored.shape) == tuple(pair.entry.shape) and stored.dtype == torch.int8


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_steps_over_a_quantized_base(checkpoints, quant):
    root, anchor, deltas, _ = checkpoints
    model = _quantized_lora(root, quant)
    model.train()
    binding = anchor.bind(model)
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    opt = AsFTAdamW(params, lr=1e-2, anchor=binding, anchor_lambda=LAM, backend="eager")
    start = [p.detach().clone() for p in params]
    for step in range(3):
        expected = _published(model, deltas)  # R at the parameters before this step
        assert float(expected) > 0
        # the library's dense reference, from the anchor's bases, agrees
        torch.testing.assert_close(paper_regularizer(binding, LAM).detach().double(), expected, rtol=2e-5, atol=0)
        opt.zero_grad()
        _loss(model, step).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)  # every pair takes part
        opt.step()
        torch.testing.assert_close(opt.anchor_loss.double(), expected, rtol=2e-5, atol=0)
    assert all(not torch.equal(p, s) for p, s in zip(params, start))
    for name, p in model.named_parameters():  # the quantized base is never written
        if not p.requires_grad:
            assert torch.equal(p.detach(), frozen[name]), name


def test_trainer_over_a_4bit_base(checkpoints, tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from asft_kernels.integrations.hf import AsFTTrainer

    root, anchor, deltas, _ = checkpoints
    model = _quantized_lora(root, "nf4")
    before = _published(model, deltas)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (4, 8), generator=gen)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = AsFTTrainer(model=model, args=args, train_dataset=data, anchor=anchor, anchor_lambda=LAM,
                          anchor_backend="eager")
    trainer.train()
    logged = [log["anchor_loss"] for log in trainer.state.log_history if "anchor_loss" in log]
    assert len(logged) == 2
    assert logged[0] == pytest.approx(float(before), rel=1e-4)  # step 1: R at the initial LoRA weights
    assert {p.key for p in trainer.anchor_binding} == set(deltas)
    assert all(not torch.equal(p.detach(), lora_before[n]) for n, p in model.named_parameters() if p.requires_grad)
