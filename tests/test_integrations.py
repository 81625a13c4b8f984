"""transformers Trainer and accelerate integration: the trajectory still equals AdamW on
``task_loss + λ·R`` (the published formula, float64), and the logs carry ``anchor_loss``."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lora, tiny_llama

from asft_kernels import AlignmentAnchor, AsFTAdamW
from asft_kernels.errors import OptimizerInputError
from asft_kernels.reference import dense_projection, paper_regularizer

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

from asft_kernels.integrations.hf import AsFTCallback, AsFTMixin, AsFTTrainer  # noqa: E402

TARGETS = ("q_proj", "v_proj")
LR, WD, BETAS, EPS, LAM = 3e-3, 0.1, (0.8, 0.95), 1e-7, 0.7


def _anchor(model) -> AlignmentAnchor:
    gen = torch.Generator().manual_seed(5)
    deltas = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in TARGETS:
            m, n = module.weight.shape
            deltas[name] = 0.3 * torch.randn(m, 3, generator=gen, dtype=torch.float64) @ torch.randn(
                3, n, generator=gen, dtype=torch.float64)
    return AlignmentAnchor.from_deltas(deltas, dtype=torch.float64)


def _batch(vocab=64, rows=6, length=10):
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    labels = ids.clone()
    labels[:, 0] = -100  # the same token count with or without the causal shift
    return ids, labels


def _dataset():
    from datasets import Dataset

    ids, labels = _batch()
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")


def _args(tmp_path, steps, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=steps, learning_rate=LR,
                  weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
                  lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no",
                  report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _setup():
    base = tiny_llama(torch.float64)
    model = lora(base, r=3, targets=TARGETS, modules_to_save=["norm"])
    return model, _anchor(base)


def _reference(model, anchor, steps, mode="paper"):
    """AdamW on task_loss + λ·R (R the published dense formula) with the Trainer's groups.
    Returns the final parameters, R before every step, and the state after each step."""
    model = copy.deepcopy(model)
    binding = anchor.bind(model, mode=mode)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS)
    ids, labels = _batch()
    regs, snapshots = [], []
    for _ in range(steps):
        opt.zero_grad()
        reg = paper_regularizer(binding, LAM)
        loss = model(input_ids=ids, labels=labels).loss + reg
        loss.backward()
        opt.step()
        regs.append(float(reg.detach()))
        snapshots.append({p.key: (p.B.detach().clone(), p.A.detach().clone()) for p in binding})
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return params, regs, snapshots


def _assert_params_match(model, ref_params, tol=1e-10):
    got = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        err = (got[name] - ref).abs().max() / ref.abs().max()
        assert err < tol, (name, float(err))


def test_trainer_trajectory_and_logs_match_reference(tmp_path):
    model, anchor = _setup()
    steps = 3
    ref_params, ref_regs, ref_snapshots = _reference(model, anchor, steps)
    trainer = AsFTTrainer(model=model, args=_args(tmp_path, steps), train_dataset=_dataset(), anchor=anchor,
                          anchor_lambda=LAM, anchor_mode="paper", anchor_residual_every=2)
    trainer.train()

    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, AsFTAdamW)
    # decay / no-decay groups from TrainingArguments; both factors of every pair in the decay group
    by_wd = {g["weight_decay"]: g for g in opt.param_groups}
    assert set(by_wd) == {WD, 0.0}
    decay_ids = {id(p) for p in by_wd[WD]["params"]}
    assert len(by_wd[WD]["anchor_pairs"]) == len(trainer.anchor_binding) == 4
    assert all(id(p.A) in decay_ids and id(p.B) in decay_ids for p in trainer.anchor_binding)
    assert all(g["lr"] == LR and g["betas"] == BETAS and g["eps"] == EPS for g in opt.param_groups)

    _assert_params_match(model, ref_params)
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == [1, 2, 3]
    for log, reg in zip(train_logs, ref_regs):
        assert log["anchor_loss"] == pytest.approx(reg, rel=1e-10)
    # per-layer residual fractions at step 2 only, equal to the dense ‖(I − C)BA‖/‖BA‖
    assert not any(k.startswith("anchor_residual/") for k in train_logs[0])
    assert not any(k.startswith("anchor_residual/") for k in train_logs[2])
    for pair in trainer.anchor_binding:
        B, A = ref_snapshots[1][pair.key]
        C = dense_projection(pair, dtype=torch.float64, device="cpu")
        dense = float(torch.linalg.matrix_norm(B @ A - C @ B @ A) / torch.linalg.matrix_norm(B @ A))
        assert train_logs[1][f"anchor_residual/{pair.key}"] == pytest.approx(dense, rel=1e-9)
    assert "anchor_residual_mean" in train_logs[1]


def test_trainer_checkpoint_resume_continues_the_trajectory(tmp_path):
    """Checkpoint after 2 steps (adapter + AsFTAdamW state), resume in a fresh trainer from a
    fresh model: step 3 lands where the uninterrupted reference does."""
    model, anchor = _setup()
    ref_params, ref_regs, _ = _reference(model, anchor, 3)
    first = AsFTTrainer(model=copy.deepcopy(model), args=_args(tmp_path, 2, save_strategy="steps", save_steps=2),
                        train_dataset=_dataset(), anchor=anchor, anchor_lambda=LAM)
    first.train()
    resumed_model = copy.deepcopy(model)
    resumed = AsFTTrainer(model=resumed_model, args=_args(tmp_path, 3), train_dataset=_dataset(), anchor=anchor,
                          anchor_lambda=LAM)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    _assert_params_match(resumed_model, ref_params)
    logs = [h for h in resumed.state.log_history if "loss" in h]
    assert [h["anchor_loss"] for h in logs] == pytest.approx(ref_regs, rel=1e-10)


class _LoggingTrainer(Trainer):
    """Stands in for a TRL trainer: a Trainer subclass with its own ``log``."""

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            logs["custom_metric"] = 1.0
        return super().log(logs, *args, **kwargs)


def test_mixin_on_a_trainer_subclass(tmp_path):
    class AsFTLoggingTrainer(AsFTMixin, _LoggingTrainer):
        pass

    model, anchor = _setup()
    ref_params, ref_regs, _ = _reference(model, anchor, 2, mode="projector")
    trainer = AsFTLoggingTrainer(model=model, args=_args(tmp_path, 2), train_dataset=_dataset(), anchor=anchor,
                                 anchor_lambda=LAM, anchor_mode="projector")
    trainer.train()
    _assert_params_match(model, ref_params)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["custom_metric"] for h in logs] == [1.0, 1.0]
    assert [h["anchor_loss"] for h in logs] == pytest.approx(ref_regs, rel=1e-10)


def test_plain_trainer_with_callback_and_user_optimizer(tmp_path):
    model, anchor = _setup()
    ref_params, ref_regs, _ = _reference(model, anchor, 2)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and "norm" in n]
    opt = AsFTAdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}], lr=LR,
                    betas=BETAS, eps=EPS, anchor=anchor.bind(model), anchor_lambda=LAM)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    trainer = Trainer(model=model, args=_args(tmp_path, 2), train_dataset=_dataset(), optimizers=(opt, sched),
                      callbacks=[AsFTCallback()])
    trainer.train()
    _assert_params_match(model, ref_params)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["anchor_loss"] for h in logs] == pytest.approx(ref_regs, rel=1e-10)


def test_non_adamw_optim_is_refused(tmp_path):
    model, anchor = _setup()
    trainer = AsFTTrainer(model=model, args=_args(tmp_path, 1, optim="adafactor"), train_dataset=_dataset(),
                          anchor=anchor)
    with pytest.raises(OptimizerInputError, match="adafactor"):
        trainer.create_optimizer()
    assert trainer.optimizer is None


def test_bad_trainer_arguments(tmp_path):
    model, anchor = _setup()
    anchor_path = tmp_path / "anchor.safetensors"
    anchor.save(anchor_path)
    trainer = AsFTTrainer(model=model, args=_args(tmp_path, 1), anchor=str(anchor_path), anchor_mode="projector")
    opt = trainer.create_optimizer()
    assert isinstance(opt, AsFTAdamW) and opt.anchor.mode == "projector" and len(opt.anchor) == 4
    with pytest.raises(ValueError, match="AnchorBinding"):
        AsFTTrainer(model=model, args=_args(tmp_path, 1), anchor=object())
    with pytest.raises(OptimizerInputError, match="anchor_lambda"):
        AsFTTrainer(model=model, args=_args(tmp_path, 1), anchor=anchor, anchor_lambda=-1.0)
    with pytest.raises(ValueError, match="anchor_mode"):
        AsFTTrainer(model=model, args=_args(tmp_path, 1), anchor=anchor, anchor_mode="dense")


def test_accelerate_prepare_and_parameter_swap_keep_anchoring(tmp_path):
    """``accelerator.prepare(model, optimizer)`` on CPU, then the parameter swap that
    accelerate performs for FSDP2 (new Parameter objects, ``fsdp2_switch_optimizer_parameters``):
    the anchored trajectory still equals the reference."""
    from accelerate import Accelerator
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    model, anchor = _setup()
    steps = 3
    ref_params, ref_regs, _ = _reference(model, anchor, steps)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and "norm" in n]
    opt = AsFTAdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}], lr=LR,
                    betas=BETAS, eps=EPS, anchor=anchor.bind(model), anchor_lambda=LAM)
    accelerator = Accelerator(cpu=True)
    model, prepared = accelerator.prepare(model, opt)
    assert prepared.optimizer is opt

    # Swap every trainable parameter for a new object, as fully_shard does.
    mapping, old_ids = {}, set()
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad:
                new = torch.nn.Parameter(p.detach().clone())
                mapping[p.data_ptr] = new
                old_ids.add(id(p))
                setattr(module, name, new)
    fsdp2_switch_optimizer_parameters(opt, mapping)
    assert not any(id(p) in old_ids for g in opt.param_groups for p in g["params"])

    ids, labels = _batch()
    regs = []
    for _ in range(steps):
        prepared.zero_grad()
        accelerator.backward(model(input_ids=ids, labels=labels).loss)
        prepared.step()
        regs.append(float(opt.anchor_loss))
    _assert_params_match(model, ref_params)
    assert regs == pytest.approx(ref_regs, rel=1e-10)


def test_trainer_errors_name_the_trainer_keywords(tmp_path):
    from asft_kernels.errors import AnchorMismatchError

    model, anchor = _setup()
    partial = AlignmentAnchor({k: v for k, v in anchor.items() if "q_proj" in k})  # no v_proj entries
    trainer = AsFTTrainer(model=model, args=_args(tmp_path, 1), anchor=partial)
    with pytest.raises(AnchorMismatchError, match="anchor_strict=False") as info:
        trainer.create_optimizer()
    assert "v_proj" in str(info.value) and " strict=False" not in str(info.value)
    trainer = AsFTTrainer(model=model, args=_args(tmp_path, 1), anchor=anchor, anchor_adapter="other")
    with pytest.raises(AnchorMismatchError, match="anchor_adapter='other'"):
        trainer.create_optimizer()
    trainer = AsFTTrainer(model=model, args=_args(tmp_path, 1), anchor=partial, anchor_strict=False)
    assert len(trainer.create_optimizer().anchor) == 2
