"""transformers ``Trainer`` integration: ``AsFTTrainer``, ``AsFTMixin``, ``AsFTCallback``.

``AsFTTrainer`` is ``Trainer`` whose :meth:`~AsFTMixin.create_optimizer` builds
:class:`~asft_kernels.AsFTAdamW` from the ``TrainingArguments`` (``learning_rate``,
``weight_decay`` with the Trainer's usual no-decay groups, ``adam_beta1``/``adam_beta2``,
``adam_epsilon``), anchored to the model it is given. Because the optimizer is created
by the Trainer itself (and after ``accelerator.prepare(model)`` where the Trainer delays
it), this also works where ``Trainer(optimizers=...)`` is refused, as under FSDP::

    trainer = AsFTTrainer(model=peft_model, args=training_args, train_dataset=ds,
                          anchor=asft.AlignmentAnchor.load("chat.anchor.safetensors"),
                          anchor_lambda=1.0, anchor_mode="paper")
    trainer.train()      # logs: {'loss': ..., 'anchor_loss': ..., ...}

The mixin form works with any ``Trainer`` subclass, e.g. TRL's::

    class AsFTSFTTrainer(AsFTMixin, SFTTrainer):
        pass

``AsFTCallback`` (added automatically by the mixin; usable on its own with a plain
``Trainer`` and a user-built ``AsFTAdamW``) puts ``anchor_loss`` into every training
log: the mean over the optimizer steps since the previous log of ``R = λ Σ‖(I − C) B A‖²_F``
at the parameters before each step. Every ``residual_every`` steps it also logs
``anchor_residual/<module>`` = ``‖(I − C) B A‖_F / ‖B A‖_F`` per layer and their mean
``anchor_residual_mean``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..anchor import MODES, AlignmentAnchor, AnchorBinding
from ..diagnostics import alignment_report
from ..errors import AsFTError, OptimizerInputError
from ..optim import AsFTAdamW, _check_lambda

# TrainingArguments.optim values whose update AsFTAdamW reproduces.
_ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")


def find_asft_optimizer(optimizer: Any) -> AsFTAdamW | None:
    """The :class:`AsFTAdamW` inside ``optimizer`` (unwrapping accelerate's
    ``AcceleratedOptimizer`` and similar ``.optimizer`` wrappers), or None."""
    for _ in range(8):  # wrappers nest a few levels at most
        if optimizer is None or isinstance(optimizer, AsFTAdamW):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class AsFTCallback(TrainerCallback):
    """Logs the AsFT regularizer (and optionally per-layer residual fractions).

    Args:
        residual_every: every this many optimizer steps, compute the per-layer
            ``‖(I − C) B A‖_F / ‖B A‖_F`` (O((m + n) r² + m k r) per layer, in float64) and
            add ``anchor_residual/<module>`` and ``anchor_residual_mean`` to the next log.
            None or 0: never.

    The values are added to the training log entries (those with a ``loss``), both in
    ``state.log_history`` and in what the reporting callbacks see. Under
    :class:`AsFTMixin` they are inserted before any callback runs; with a plain
    ``Trainer`` they are inserted when this callback's ``on_log`` runs: ``log_history``
    and the console printer get them, but the reporting integrations (``report_to``),
    which the Trainer registers before user callbacks, do not. Use the mixin for those.
    """

    def __init__(self, residual_every: int | None = None) -> None:
        if residual_every is not None and (not isinstance(residual_every, int) or residual_every < 0):
            raise AsFTError(f"residual_every must be a non-negative int or None, got {residual_every!r}")
        self.residual_every = residual_every or 0
        self._loss_sum: torch.Tensor | None = None
        self._loss_steps = 0
        self._pending: dict[str, float] = {}

    # --------------------------------------------------------------- collection
    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if getattr(optimizer, "step_was_skipped", False):  # GradScaler found inf: no step
            return
        opt = find_asft_optimizer(optimizer)
        loss = None if opt is None else opt.anchor_loss
        if loss is None:
            return
        # keep it on the device: one host sync per log, not per step
        loss = loss.detach().to(torch.float64)
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss.to(self._loss_sum.device)
        self._loss_steps += 1

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if not self.residual_every or state.global_step % self.residual_every != 0:
            return
        opt = find_asft_optimizer(optimizer)
        if opt is None or opt.anchor is None:
            return
        self._pending.update(self.residual_metrics(opt.anchor))

    @staticmethod
    def residual_metrics(binding: AnchorBinding) -> dict[str, float]:
        """``{"anchor_residual/<module>": fraction, ..., "anchor_residual_mean": mean}``
        for the current parameters of ``binding``'s pairs (NaN-valued layers are
        skipped: ``B A = 0``)."""
        rows = alignment_report(None, binding)
        metrics = {f"anchor_residual/{r.key}": r.residual_fraction for r in rows
                   if r.residual_fraction == r.residual_fraction}
        if metrics:
            metrics["anchor_residual_mean"] = sum(metrics.values()) / len(metrics)
        return metrics

    def pop_metrics(self) -> dict[str, float]:
        """The values gathered since the last call (``anchor_loss`` and pending
        residual fractions), as plain floats; resets the accumulators."""
        metrics: dict[str, float] = {}
        if self._loss_steps:
            metrics["anchor_loss"] = float(self._loss_sum) / self._loss_steps
        metrics.update(self._pending)
        self._loss_sum, self._loss_steps, self._pending = None, 0, {}
        return metrics

    # --------------------------------------------------------------- emission
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or "anchor_loss" in logs:
            return  # not a training log, or already filled in by AsFTMixin.log
        metrics = self.pop_metrics()
        if not metrics:
            return
        logs.update(metrics)
        # Trainer.log appended a copy of the logs before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_begin(self, args, state, control, **kwargs):
        self._loss_sum, self._loss_steps, self._pending = None, 0, {}


# Keywords of AlignmentAnchor.bind / AsFTAdamW and the trainer keywords that set them.
_TRAINER_KEYWORDS = {"strict": "anchor_strict", "adapter_name": "anchor_adapter", "mode": "anchor_mode",
                     "backend": "anchor_backend"}
_KEYWORD_RE = re.compile(r"(?<![\w.])(" + "|".join(_TRAINER_KEYWORDS) + r")=")


def _in_trainer_words(exc: AsFTError) -> AsFTError:
    """``exc`` (same class) with the keywords of ``bind``/``AsFTAdamW`` in its message
    replaced by the trainer keywords that set them (``strict=False`` →
    ``anchor_strict=False``), since inside a trainer those are what the user passes."""
    message = _KEYWORD_RE.sub(lambda m: _TRAINER_KEYWORDS[m.group(1)] + "=", str(exc))
    try:
        return type(exc)(message)
    except TypeError:  # an error class with another constructor: keep the original
        return exc


class AsFTMixin:
    """Makes a ``transformers.Trainer`` subclass train with :class:`~asft_kernels.AsFTAdamW`.

    Put it first in the bases: ``class MyTrainer(AsFTMixin, SFTTrainer)``. Keyword
    arguments (all others go to the Trainer):

    Args:
        anchor: an :class:`~asft_kernels.AlignmentAnchor` (or the path of an anchor file),
            bound to the model when the optimizer is created, or an
            :class:`~asft_kernels.AnchorBinding` already bound to it. None: plain AdamW.
        anchor_lambda: λ ≥ 0 (the paper uses 1.0).
        anchor_mode: ``"paper"`` (default), ``"projector"`` or ``"full"``; ignored for a binding.
        anchor_backend: ``"auto"``, ``"eager"``, ``"cpp"`` or ``"triton"``.
        anchor_adapter: the PEFT adapter to anchor (default ``"default"``).
        anchor_strict: passed to :meth:`AlignmentAnchor.bind` (False leaves LoRA modules
            without an anchor entry unanchored).
        anchor_residual_every: log per-layer residual fractions every this many steps.

    ``TrainingArguments.optim`` must be ``adamw_torch`` or ``adamw_torch_fused`` (the
    default): the step is AdamW's. An optimizer passed as ``optimizers=`` or
    ``optimizer_cls_and_kwargs=`` takes precedence, as in ``Trainer``.
    """

    def __init__(
        self,
        *args,
        anchor: AlignmentAnchor | AnchorBinding | str | os.PathLike | None = None,
        anchor_lambda: float = 1.0,
        anchor_mode: str = "paper",
        anchor_backend: str = "auto",
        anchor_adapter: str = "default",
        anchor_strict: bool = True,
        anchor_residual_every: int | None = None,
        **kwargs,
    ) -> None:
        _check_lambda(anchor_lambda)
        if anchor_mode not in MODES:
            raise AsFTError(f"unknown anchor_mode {anchor_mode!r}; expected one of {MODES}")
        if isinstance(anchor, (str, os.PathLike)):
            anchor = AlignmentAnchor.load(anchor)
        if anchor is not None and not isinstance(anchor, (AlignmentAnchor, AnchorBinding)):
            raise AsFTError(
                f"anchor must be an AlignmentAnchor, an AnchorBinding, a path or None, got {type(anchor).__name__}"
            )
        self.anchor = anchor
        self.anchor_lambda = float(anchor_lambda)
        self.anchor_mode = anchor.mode if isinstance(anchor, AnchorBinding) else anchor_mode
        self.anchor_backend = anchor_backend
        self.anchor_adapter = anchor_adapter
        self.anchor_strict = anchor_strict
        self.anchor_binding: AnchorBinding | None = None
        super().__init__(*args, **kwargs)
        callback = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, AsFTCallback)), None)
        if callback is None:
            callback = AsFTCallback(residual_every=anchor_residual_every)
            self.add_callback(callback)
        self.asft_callback = callback

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build :class:`~asft_kernels.AsFTAdamW` from ``self.args`` (unless an optimizer
        was given), with the Trainer's decay / no-decay param groups and the anchor bound
        to ``model`` (the model the Trainer optimizes: ``self.model`` or the prepared one)."""
        if self.optimizer is not None or getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        opt_model = self.model if model is None else model
        optim_name = getattr(self.args.optim, "value", self.args.optim)
        if optim_name not in _ADAMW_OPTIMS:
            raise OptimizerInputError(
                f"AsFTTrainer builds AsFTAdamW, an AdamW; TrainingArguments.optim={optim_name!r} is not one of "
                f"{_ADAMW_OPTIMS}. Use one of those, or pass your own optimizer with optimizers=(...)"
            )
        decay = set(self.get_decay_parameter_names(opt_model))
        trainable = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in trainable if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]] or groups[:1]
        self.anchor_binding = self._bind_anchor(opt_model)
        try:
            self.optimizer = AsFTAdamW(
                groups,
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                anchor=self.anchor_binding,
                anchor_lambda=self.anchor_lambda,
                backend=self.anchor_backend,
            )
        except AsFTError as exc:
            raise _in_trainer_words(exc) from exc
        return self.optimizer

    def _bind_anchor(self, model: nn.Module) -> AnchorBinding | None:
        if self.anchor is None or isinstance(self.anchor, AnchorBinding):
            return self.anchor
        try:
            return self.anchor.bind(model, mode=self.anchor_mode, adapter_name=self.anchor_adapter,
                                    strict=self.anchor_strict)
        except AsFTError as exc:
            raise _in_trainer_words(exc) from exc

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """``Trainer.log`` with ``anchor_loss`` (and due residual fractions) added to
        training logs before they are recorded and reported."""
        if "loss" in logs:
            logs.update(self.asft_callback.pop_metrics())
        return super().log(logs, *args, **kwargs)


class AsFTTrainer(AsFTMixin, Trainer):
    """``transformers.Trainer`` training with :class:`~asft_kernels.AsFTAdamW`; see
    :class:`AsFTMixin` for the extra keyword arguments (``anchor``, ``anchor_lambda``,
    ``anchor_mode``, ...)."""


__all__ = ["AsFTCallback", "AsFTMixin", "AsFTTrainer", "find_asft_optimizer"]
