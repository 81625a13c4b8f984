"""Host side of the Triton backend: validation, pointer tables, launches, and the
contract functions ``supports``, ``stats_pass``, ``prepare``/``step`` and ``fused_step``
(:mod:`asft_kernels.ops.schema`), the first and last registered as the CUDA kernels of the
``asft::`` ops.

A call costs a fixed number of launches and torch ops per bucket of pairs (parameter
dtype, U dtype, padded rank), however many pairs it holds: two factor-kernel launches per
bucket (plus one of P' tiles where the bucket does not split m, :func:`.layout.p_split`),
one reduction launch for all of them; everything that depends on the number of pairs is
plain Python (validation, addresses) or cached (the strip tables); the one exception is the
stats pass, which allocates its three outputs per pair.

``prepare``/``step`` (docs/triton.md, "The prepared step") is the contract the plan uses:
tables built once on the device, one terms launch per bucket that advances the counters
and computes the bias corrections and anchoring terms on the device, and nothing read back
to the host, so a step can be captured in a CUDA graph.

``fused_step`` (counters on the host, terms precomputed) is the direct op call: it validates
its tensors and builds its tables on every call and keeps nothing afterwards; the tables that
outlive a call are those of a ``prepare`` handle, which the plan owns (docs/triton.md,
"Direct op calls").
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...errors import OptimizerInputError
from ..schema import BATCH_FIELDS, AdamWHyper, AnchoredBatch, BucketTensors, _lib, op_kernel
from .kernels import (
    _A,
    _B,
    _EXP_AVG_A,
    _EXP_AVG_B,
    _EXP_AVG_SQ_A,
    _EXP_AVG_SQ_B,
    _FACTOR_A,
    _FACTOR_B,
    _G,
    _GRAD_A,
    _GRAD_B,
    _GRAD_SCALE,
    _H,
    _INDEX,
    _K,
    _KEEP,
    _LR,
    _M,
    _M_ROWS,
    _N_COLS,
    _P,
    _Q_B,
    _R_B,
    _RANK,
    _U,
    _W,
    DOT_PRECISION,
    HYPER_FIELDS,
    PAIR_FIELDS,
    REDUCE_BLOCK,
    SCALAR_FIELDS,
    _factor_kernel,
    _interpreting,
    _p_tile_kernel,
    _reduce_kernel,
    _terms_kernel,
    jitted,
)
from .layout import MAX_TRITON_RANK, _layout, kernel_config, p_split, padded_rank, ptile_config, terms_config

# Parameter dtypes the kernels run (fp32 math and state); U may also be fp64 (converted on load).
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}


#: Environment variable naming the default precision of the U products (:func:`u_precision`).
U_PRECISION_ENV = "ASFT_TRITON_U_PRECISION"
#: Default ``tl.dot`` precision of the products with U (``U R_B``, ``Uᵀ B'``): ``"ieee"``
#: (fp32 on the FMA units) until a GPU run has measured the tensor-core precisions against
#: float64 (docs/triton.md).
DEFAULT_U_PRECISION = "ieee"


def u_precisions() -> tuple[str, ...]:
    """The fp32 ``tl.dot`` input precisions the installed Triton's CUDA backend accepts
    (read at run time: Triton 3.6 offers ``tf32``, ``tf32x3``, ``ieee``; later releases add
    ``bf16x3``, ``bf16x6``); under the interpreter, those of them it accepts."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # no CUDA backend in this Triton: only what the language always has
        return ("ieee",)
    allowed = tuple(CUDAOptions.allowed_dot_input_precisions)
    if _interpreting():  # the interpreter accepts fewer (it computes all of them in fp32)
        try:
            from triton.runtime.interpreter import InterpreterOptions

            allowed = tuple(p for p in allowed if p in InterpreterOptions.allowed_dot_input_precisions)
        except (ImportError, AttributeError):
            allowed = tuple(p for p in allowed if p in ("tf32", "tf32x3", "ieee"))
    return allowed


def u_precision(requested: str | None = None) -> str:
    """The precision of the U products for ``requested`` (None: ``$ASFT_TRITON_U_PRECISION``
    or :data:`DEFAULT_U_PRECISION`).

    Raises:
        OptimizerInputError: a precision the installed Triton does not offer.
    """
    import os

    value = requested if requested is not None else os.environ.get(U_PRECISION_ENV) or DEFAULT_U_PRECISION
    allowed = u_precisions()
    if value not in allowed:
        raise OptimizerInputError(
            f"triton: U product precision {value!r} is not offered by Triton {triton.__version__}; "
            f"choose one of {allowed}")
    return value


#: the step counters of a bucket live on the parameters' device (the plan's buffer there)
DEVICE_COUNTERS = True


def is_available(warn: bool = True) -> bool:
    """True when the kernels can run here: a CUDA device is present, or the Triton
    interpreter is switched on (``TRITON_INTERPRET=1``, CPU tensors). ``warn`` is the
    contract's (nothing here warns: an unsupported Triton warned at import)."""
    return torch.cuda.is_available() or _interpreting()


def supports(dtype: torch.dtype, rank: int) -> bool:
    """Pairs the kernels run: fp32/bf16/fp16 parameters of LoRA rank up to
    :data:`MAX_TRITON_RANK`. fp64 (a reference setting; Triton's fp64 dot products are slow)
    and wider ranks (the r×r tiles would spill registers) are routed to the eager backend
    by :func:`asft_kernels.ops.route`."""
    return dtype in PARAM_DTYPES and rank <= MAX_TRITON_RANK


# ---------------------------------------------------------------------------- validation


def _check_device(tensors: Sequence[Tensor], what: str) -> torch.device:
    device = tensors[0].device
    if _interpreting():
        if device.type != "cpu":
            raise OptimizerInputError(
                f"triton backend under TRITON_INTERPRET=1 runs CPU tensors; {what} is on {device}")
    elif device.type != "cuda":
        raise OptimizerInputError(f"triton backend runs CUDA tensors; {what} is on {device}")
    return device


def _check_pair(j: int, U: Tensor, B: Tensor, A: Tensor) -> tuple[int, int, int, int]:
    """``(m, n, r, k)`` of pair ``j``; refuses shapes that do not chain and pairs the backend
    does not support (:func:`supports`)."""
    if B.ndim != 2 or A.ndim != 2 or U.ndim != 2:
        raise OptimizerInputError(
            f"triton: U[{j}], B[{j}], A[{j}] must be 2-D (m, k), (m, r), (r, n); found {tuple(U.shape)}, "
            f"{tuple(B.shape)}, {tuple(A.shape)}")
    m, r = B.shape
    n = A.shape[1]
    k = U.shape[1]
    if A.shape[0] != r or U.shape[0] != m:
        raise OptimizerInputError(
            f"triton: U[{j}] {tuple(U.shape)}, B[{j}] {tuple(B.shape)}, A[{j}] {tuple(A.shape)} do not chain "
            "as (m, k), (m, r), (r, n)")
    if B.dtype != A.dtype:
        raise OptimizerInputError(f"triton: A[{j}] and B[{j}] must share a dtype; found {A.dtype} and {B.dtype}")
    if not supports(B.dtype, r):
        raise OptimizerInputError(
            f"triton: pair {j} has {B.dtype} parameters of rank {r}; this backend runs fp32/bf16/fp16 pairs of "
            f"rank <= {MAX_TRITON_RANK} (asft_kernels.ops.route sends the others to the eager backend)")
    if U.dtype not in _TL_DTYPES:
        raise OptimizerInputError(f"triton: U[{j}] must be a float tensor, found {U.dtype}")
    return m, n, r, k


def _require(t: Tensor, name: str, j: int, device: torch.device, shape=None, dtype=None,
             contiguous: bool = True) -> None:
    """Refuse ``name[j]`` unless it is on ``device`` and, where given, has ``shape`` and
    ``dtype`` and (``contiguous``) is contiguous."""
    if t.device != device:
        raise OptimizerInputError(f"triton: {name}[{j}] is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        raise OptimizerInputError(f"triton: {name}[{j}] {tuple(t.shape)} must be contiguous")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise OptimizerInputError(f"triton: {name}[{j}] has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise OptimizerInputError(f"triton: {name}[{j}] is {t.dtype}, expected {dtype}")


#: Per contract field: its shape as dimension letters of the pair's ``(m, n, r, k)``, and its
#: dtype: ``None`` (any the pair check allows), ``"param"`` (the pair's parameter dtype) or fp32.
_FIELDS = {
    "A": ("rn", None), "B": ("mr", None), "grad_A": ("rn", "param"), "grad_B": ("mr", "param"),
    "exp_avg_A": ("rn", torch.float32), "exp_avg_sq_A": ("rn", torch.float32),
    "exp_avg_B": ("mr", torch.float32), "exp_avg_sq_B": ("mr", torch.float32), "U": ("mk", None),
    "P": ("kr", torch.float32), "G": ("rr", torch.float32), "M": ("rr", torch.float32),
    "Q_B": ("rr", torch.float32), "R_B": ("kr", torch.float32), "H": ("rr", torch.float32),
}


def _check_lengths(lists: dict[str, list], count: int, where: str) -> None:
    """Refuse per-pair lists whose length is not ``count`` (A's)."""
    for name, values in lists.items():
        if len(values) != count:
            raise OptimizerInputError(f"triton {where}: {name} has {len(values)} entries, A has {count}")


def _check_tensors(lists: dict[str, list[Tensor]], names: Sequence[str], loose: Sequence[str] = ()
                   ) -> tuple[list[tuple[int, int, int, int]], torch.device]:
    """Validate the per-pair tensors of a call: every pair (:func:`_check_pair`), the device
    (:func:`_check_device`), then each field of ``names`` against :data:`_FIELDS` (device,
    contiguity, shape, dtype); the fields of ``loose`` only for device and shape (outputs
    the caller reduces into stand-ins). Lists of equal length holding ``A``, ``B`` and ``U``.
    Each field is checked in C-level passes over its list; one that fails is checked pair by
    pair to raise :class:`OptimizerInputError` naming the field, pair, and what is wrong.

    Returns:
        ``(m, n, r, k)`` per pair, and the device.
    """
    A, B, U = lists["A"], lists["B"], lists["U"]
    shapes = [_check_pair(j, U[j], B[j], A[j]) for j in range(len(A))]
    device = _check_device(B, "B")
    param_dtypes = list(map(_dtype, B))
    for name in names:
        letters, dtype = _FIELDS[name]
        rows, cols = ("mnrk".index(c) for c in letters)
        exact = name not in loose
        tensors, want = lists[name], [(dims[rows], dims[cols]) for dims in shapes]
        dtypes = None if dtype is None or not exact else param_dtypes if dtype == "param" else [dtype] * len(want)
        if (list(map(_shape, tensors)) == want and set(map(_device, tensors)) == {device}
                and (dtypes is None or list(map(_dtype, tensors)) == dtypes)
                and (not exact or all(map(Tensor.is_contiguous, tensors)))):
            continue  # the usual case
        for j, t in enumerate(tensors):
            _require(t, name, j, device, want[j], None if dtypes is None else dtypes[j], contiguous=exact)
    return shapes, device


def _check_steps(steps: Sequence[Tensor], name: str) -> None:
    for j, t in enumerate(steps):
        if not isinstance(t, Tensor) or t.numel() != 1 or t.device.type != "cpu" or not t.dtype.is_floating_point:
            what = (f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor)
                    else type(t).__name__)
            raise OptimizerInputError(
                f"triton: {name}[{j}] must be a one-element float CPU tensor (the step counter); found {what}")


def _read_steps(steps: Sequence[Tensor]) -> list[float]:
    """The values of one-element step-counter tensors, in one host read (one stack, not one
    conversion per tensor)."""
    if len({tuple(t.shape) for t in steps}) == 1:
        stacked = torch.stack(list(steps))
    else:  # mixed 0-d / (1,) counters
        stacked = torch.cat([t.reshape(1) for t in steps])
    return [float(v) for v in stacked.reshape(-1).tolist()]


# ---------------------------------------------------------------------------- launches


def _buckets(U: Sequence[Tensor], B: Sequence[Tensor]) -> dict[tuple, list[int]]:
    """Pair indices grouped by (param dtype, U dtype, padded rank): one launch each."""
    groups: dict[tuple, list[int]] = {}
    for j, (u, b) in enumerate(zip(U, B)):
        groups.setdefault((b.dtype, u.dtype, padded_rank(b.shape[1])), []).append(j)
    return groups


_TABLE_FIELDS = ((_B, "B"), (_GRAD_B, "grad_B"), (_EXP_AVG_B, "exp_avg_B"), (_EXP_AVG_SQ_B, "exp_avg_sq_B"),
                 (_U, "U"), (_Q_B, "Q_B"), (_R_B, "R_B"), (_A, "A"), (_GRAD_A, "grad_A"),
                 (_EXP_AVG_A, "exp_avg_A"), (_EXP_AVG_SQ_A, "exp_avg_sq_A"), (_H, "H"))


def _output(t: Tensor) -> Tensor:
    """A contiguous fp32 tensor to reduce into (``t`` itself when it already is one)."""
    if t.is_contiguous() and t.dtype == torch.float32:
        return t
    return torch.empty(t.shape, dtype=torch.float32, device=t.device)


# ---------------------------------------------------------------------------- contract


def stats_pass(
    U: Sequence[Tensor], B: Sequence[Tensor], A: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Statistics of each pair from the stored parameters, in grouped launches.

    Args:
        U: per pair (m, k) basis (fp32/bf16/fp16/fp64). B: per pair (m, r), A: per pair
            (r, n), fp32/bf16/fp16 with r <= :data:`MAX_TRITON_RANK`.

    Returns:
        ``(P, G, M)`` lists of fp32 tensors: ``P = Uᵀ B`` (k, r), ``G = Bᵀ B`` (r, r),
        ``M = A Aᵀ`` (r, r), each its own allocation.

    Raises:
        OptimizerInputError: mismatched lengths, shapes or dtypes, a pair the backend does
            not support (fp64, r > :data:`MAX_TRITON_RANK`), or tensors on a device the
            backend cannot run (CUDA, or CPU under ``TRITON_INTERPRET=1``).
    """
    if not (len(U) == len(B) == len(A)):
        raise OptimizerInputError(f"triton stats_pass: {len(U)} U, {len(B)} B and {len(A)} A tensors")
    if not B:
        return [], [], []
    # Read-only inputs: a contiguous copy is as good as the original.
    U, B, A = ([t.contiguous() for t in ts] for ts in (U, B, A))
    shapes, device = _check_tensors({"U": U, "B": B, "A": A}, ("U", "B", "A"))
    # Three fresh outputs per pair (the op's outputs must not alias each other): the only
    # torch ops of this call whose number grows with the number of pairs.
    outputs = tuple([torch.empty(shape, dtype=torch.float32, device=device) for shape in per_pair]
                    for per_pair in ([(k, r) for _, _, r, k in shapes], [(r, r) for _, _, r, _ in shapes],
                                     [(r, r) for _, _, r, _ in shapes]))
    prep = _prepare({"U": U, "B": B, "A": A}, shapes, device, outputs, update=False)
    _launch(prep, [_upload([_STATS_ROW] * len(launch.idx), torch.float32, device) for launch in prep.launches])
    return outputs


#: Fields a direct call validates, in the order they are checked per pair.
_DIRECT_FIELDS = ("A", "B", "grad_A", "grad_B", "exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B", "U",
                  "Q_B", "R_B", "H", "P", "G", "M")


def fused_step(batch: AnchoredBatch, hyper_A: AdamWHyper, hyper_B: AdamWHyper | None = None) -> None:
    """Anchored AdamW step for a batch of pairs in grouped launches (contract:
    :mod:`asft_kernels.ops.schema`).

    Shapes per pair: ``A``, ``grad_A``, ``exp_avg*_A``: (r, n); ``B``, ``grad_B``,
    ``exp_avg*_B``: (m, r); ``U``: (m, k); ``P``, ``R_B``: (k, r); ``G``, ``M``, ``Q_B``,
    ``H``: (r, r); ``step_A``, ``step_B``: one-element CPU tensors, already incremented.
    Parameters fp32/bf16/fp16 with r <= :data:`MAX_TRITON_RANK`; optimizer state and
    terms fp32; A steps with ``hyper_A``, B with ``hyper_B`` (default: ``hyper_A``),
    ``lr`` in parameter units per step. Updates ``A``, ``B``, the
    moments, and ``P``, ``G``, ``M`` (the statistics of the stored new parameters) in place;
    statistics that are not fp32 contiguous are reduced into fp32 stand-ins and copied back.

    A direct call (the op): it validates its tensors and builds its tables on every call and
    keeps nothing after it; the optimizer steps through :func:`prepare` / :func:`step`.

    Raises:
        OptimizerInputError: inconsistent lengths/shapes/dtypes/devices, non-contiguous
            inputs, or a pair the backend does not support (fp64, r > MAX_TRITON_RANK:
            :func:`asft_kernels.ops.route` sends those to the eager backend); raised before
            anything is written.
    """
    count = len(batch)
    lists = {name: list(values) for name, values in zip(BATCH_FIELDS, batch.op_args())}
    _check_lengths(lists, count, "fused_step")
    if count == 0:
        return
    # Read-only inputs: a contiguous copy is as good as the original.
    for name in ("grad_A", "grad_B", "U", "Q_B", "R_B", "H"):
        lists[name] = [t.contiguous() for t in lists[name]]
    # P, G, M only for shape and device: any other dtype or layout goes through a stand-in.
    shapes, device = _check_tensors(lists, _DIRECT_FIELDS, loose=("P", "G", "M"))
    _check_steps(lists["step_B"], "step_B")
    _check_steps(lists["step_A"], "step_A")
    # Reduced into fp32 contiguous stand-ins where a statistic is not one, copied back after.
    stats = (lists["P"], lists["G"], lists["M"])
    outputs = tuple([_output(t) for t in stat] for stat in stats)
    _run_direct(_prepare(lists, shapes, device, outputs, update=True), lists, hyper_A,
                hyper_A if hyper_B is None else hyper_B)
    for out, stat in zip(outputs, stats):
        for o, t in zip(out, stat):
            if o is not t:
                t.copy_(o)


# ---------------------------------------------------------------------------- tables
#
# What a call needs beyond its gradients and counter values (pair tables, scratch layout,
# reduction table, launch options) is built by ``_prepare``: once per bucket by ``prepare``
# (kept on its handle, which the plan owns), and per call by ``stats_pass`` and ``fused_step``
# (nothing of it is kept after the call).

_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")


@dataclass
class _Launch:
    """One bucket (param dtype, U dtype, padded rank) of a call's tables."""

    idx: list[int]
    rows: list[list[int]]  # pair-table rows; the gradient fields are filled in per call
    b_tiles: Tensor
    a_tiles: Tensor
    scratch: tuple[int, int]  # (offset, fp32 elements) of this bucket's partials in the call's scratch
    constexprs: dict
    p_tiles: Tensor | None = None  # (pair, first row of P') per program of _p_tile_kernel; None: split-m
    pair_table: Tensor | None = None
    grad_ptrs: tuple = ()


@dataclass
class _Prepared:
    """What a call with one set of tensors needs beyond its gradients and counter values
    (:func:`_prepare`)."""

    device: torch.device
    a_shapes: tuple
    b_shapes: tuple
    param_dtypes: tuple
    launches: list[_Launch]
    scratch_numel: int  # fp32 partial statistics of every bucket, allocated per call
    reduce_table: Tensor | None
    reduce_grid: tuple[int, int]


def _prepare(tensors: dict[str, list[Tensor]], shapes: list[tuple[int, int, int, int]], device: torch.device,
             outputs: tuple[list[Tensor], list[Tensor], list[Tensor]], update: bool,
             precision: str | None = None) -> _Prepared:
    """Everything a call needs but its gradients and counter values, for validated
    ``tensors`` (contract names to per-pair lists, ``w`` (k,) per pair included for a
    prepared step): pair tables, scratch, the reduction into ``outputs`` (fp32 contiguous
    ``P`` (k, r), ``G`` (r, r), ``M`` (r, r) per pair), the P' tiles of the buckets that do
    not split m (:func:`.layout.p_split`) and the launch options of the update (``update``)
    or the statistics pass. Pairs are bucketed by (param dtype, U dtype, padded rank), one
    set of launches each. ``precision``: of the U products (:func:`u_precision`)."""
    precision = u_precision(precision)
    fields = [(int(field), tensors[name]) for field, name in _TABLE_FIELDS
              if name in tensors and not name.startswith("grad")]
    fields += [(int(_P), outputs[0]), (int(_G), outputs[1]), (int(_M), outputs[2])]
    if "w" in tensors:
        fields.append((int(_W), tensors["w"]))
    plans, total = [], 0
    for (pdt, udt, block_r), idx in _buckets(tensors["U"], tensors["B"]).items():
        split = p_split([shapes[j] for j in idx])
        layout = _layout(tuple(shapes[j] for j in idx), block_r, udt.itemsize, device, split)
        plans.append((pdt, udt, block_r, idx, layout, total, split))
        total += layout[4]
    launches, jobs = [], []
    for pdt, udt, block_r, idx, (b_tiles, a_tiles, p_spans, m_spans, numel), base, split in plans:
        rows = []
        for j in idx:
            row = [0] * int(PAIR_FIELDS)
            for field, values in fields:
                row[field] = values[j].data_ptr()
            row[_M_ROWS], row[_N_COLS], row[_RANK], row[_K] = shapes[j]
            row[_INDEX] = j
            rows.append(row)
        # A bucket that splits m (small k: small U products) keeps them at "ieee" (its tensor-core
        # variant spills at padded rank 64 with Triton 3.6, layout.kernel_config).
        constexprs = dict(PARAM_DTYPE=_TL_DTYPES[pdt], U_DTYPE=_TL_DTYPES[udt], UPDATE=update, BLOCK_R=block_r,
                          DOT_PRECISION=DOT_PRECISION, U_PRECISION="ieee" if split else precision, P_SPLIT=split,
                          NATIVE_BF16=not _interpreting())
        p_tiles = None
        if not split:
            block_kp = ptile_config(block_r, precision)["BLOCK_KP"]
            p_rows = [(local, k0) for local, j in enumerate(idx) for k0 in range(0, shapes[j][3], block_kp)]
            p_tiles = _upload(p_rows, torch.int64, device).reshape(-1, 2)
        launch = _Launch(idx, rows, b_tiles, a_tiles, (base, numel), constexprs, p_tiles)
        if not update:  # no gradient addresses to fill in
            launch.pair_table = _upload(rows, torch.int64, device)
        launches.append(launch)
        for local, j in enumerate(idx):
            m, n, r, k = shapes[j]
            p_off, p_stride, p_tiles_n = p_spans[local]
            m_off, m_stride, m_tiles = m_spans[local]
            if k > 0 and split:
                jobs.append((outputs[0][j].data_ptr(), base + p_off, p_stride, k * r, p_tiles_n))
            jobs.append((outputs[1][j].data_ptr(), base + p_off + k * r * split, p_stride, r * r, p_tiles_n))
            jobs.append((outputs[2][j].data_ptr(), base + m_off, m_stride, r * r, m_tiles))
    table = _upload(jobs, torch.int64, device) if jobs else None
    grid = (len(jobs), triton.cdiv(max((job[3] for job in jobs), default=1), REDUCE_BLOCK))
    return _Prepared(device, tuple(map(_shape, tensors["A"])), tuple(map(_shape, tensors["B"])),
                     tuple(map(_dtype, tensors["B"])), launches, total, table, grid)


def _fits(grads: Sequence[Tensor], shapes: tuple, dtypes: tuple, device: torch.device) -> bool:
    """Whether one factor's gradients have ``shapes`` and ``dtypes``, are contiguous and on
    ``device`` (C-level passes, no Python loop per pair)."""
    return (tuple(map(_shape, grads)) == shapes and tuple(map(_dtype, grads)) == dtypes
            and all(map(Tensor.is_contiguous, grads)) and set(map(_device, grads)) == {device})


def _upload(data: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host table on ``device``: from pinned memory without waiting for the GPU on
    CUDA (the caching host allocator keeps the buffer until the copy has run)."""
    if device.type == "cuda":
        return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(data, dtype=dtype, device=device)


def _run_direct(prep: _Prepared, lists: dict[str, list[Tensor]], hyper_A: AdamWHyper, hyper_B: AdamWHyper) -> None:
    """An update of a direct call with its tables ``prep``: the counters read at once, the
    bias corrections, the gradients' addresses, the launches. A's rows take ``hyper_A``, B's
    ``hyper_B``."""
    count = len(lists["A"])
    steps = _read_steps(lists["step_B"] + lists["step_A"])
    # One set of bias corrections when every counter holds the same step (the usual case).
    uniform = steps.count(steps[0]) == len(steps)
    terms_A: dict[float, list[float]] = {}
    terms_B: dict[float, list[float]] = {}
    for t in steps[:1] if uniform else steps:
        if t not in terms_A:
            terms_A[t] = _bias_terms(float(t), hyper_A.lr, hyper_A.beta1, hyper_A.beta2)
            terms_B[t] = _bias_terms(float(t), hyper_B.lr, hyper_B.beta1, hyper_B.beta2)
    grad_A, grad_B = lists["grad_A"], lists["grad_B"]
    adamw_A, adamw_B = _adamw_row(hyper_A), _adamw_row(hyper_B)
    scalars = []
    for launch in prep.launches:
        _set_grad_ptrs(launch, grad_A, grad_B, prep.device)
        # Scalars in double precision on the host, as torch.optim.AdamW computes them.
        if uniform:
            scalars.append([_scalar_row(terms_B[steps[0]], terms_A[steps[0]], adamw_B, adamw_A)] * len(launch.idx))
        else:
            scalars.append([_scalar_row(terms_B[steps[j]], terms_A[steps[count + j]], adamw_B, adamw_A)
                            for j in launch.idx])
    _launch(prep, [_upload(rows, torch.float32, prep.device) for rows in scalars])


def _set_grad_ptrs(launch: _Launch, grad_A: Sequence[Tensor], grad_B: Sequence[Tensor],
                   device: torch.device) -> None:
    """Write the addresses of the bucket's gradients (B's then A's, per pair) into its pair
    table, re-uploading it only when one changed."""
    ptrs = (*map(Tensor.data_ptr, map(grad_B.__getitem__, launch.idx)),
            *map(Tensor.data_ptr, map(grad_A.__getitem__, launch.idx)))
    if ptrs != launch.grad_ptrs:
        half = len(launch.idx)
        for local, row in enumerate(launch.rows):
            row[_GRAD_B], row[_GRAD_A] = ptrs[local], ptrs[half + local]
        launch.pair_table = _upload(launch.rows, torch.int64, device)
        launch.grad_ptrs = ptrs


def _adamw_row(hyper: AdamWHyper) -> list[float]:
    """``[1 − lr·wd, β₁, 1−β₁, β₂, 1−β₂, ε, sign]`` of one factor, in double precision."""
    lr, beta1, beta2, eps, weight_decay, maximize = hyper.op_args()
    return [1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, -1.0 if maximize else 1.0]


def _scalar_row(bias_B: list[float], bias_A: list[float], adamw_B: list[float],
                adamw_A: list[float] | None = None) -> list[float]:
    """One row of the scalar table (``kernels.SCALAR_FIELDS``) from host values: per factor
    ``[lr/(1−β₁ᵗ), √(1−β₂ᵗ)]`` then its ``adamw`` = ``[1 − lr·wd, β₁, 1−β₁, β₂, 1−β₂, ε, sign]``
    (A's ``adamw_A``, default B's); gradient scale (its reciprocal) 1, writes on."""
    row = [0.0] * int(SCALAR_FIELDS)
    for base, bias, adamw in ((int(_FACTOR_B), bias_B, adamw_B), (int(_FACTOR_A), bias_A, adamw_A or adamw_B)):
        row[base : base + 9] = [*bias, *adamw]
    row[_GRAD_SCALE] = row[_KEEP] = 1.0
    return row


#: The scalar row of the statistics pass: its kernels read only the write switch (on).
_STATS_ROW = _scalar_row([0.0, 1.0], [0.0, 1.0], [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])


def _launch(prep: _Prepared, scalars: list[Tensor], scratch: Tensor | None = None, grad_scale: bool = False) -> None:
    """The factor-kernel launches of every bucket (and its P' tiles where it does not split
    m), then one reduction of all partials.

    ``scalars``: per bucket, the device table of per-pair AdamW scalars (fp32,
    (pairs, ``SCALAR_FIELDS``)); ``scratch``: fp32 partials of ``prep.scratch_numel``
    elements (allocated here when None); ``grad_scale``: whether the gradients are divided by
    the tables' gradient scale."""
    kernel = jitted(_factor_kernel)
    # Allocated per call when not given: the partials can reach hundreds of MB at large k
    # with split m, and the caching allocator hands the same block back call after call.
    if scratch is None:
        scratch = torch.empty(prep.scratch_numel, dtype=torch.float32, device=prep.device)
    for launch, table in zip(prep.launches, scalars):
        update = launch.constexprs["UPDATE"]
        offset, numel = launch.scratch
        for factor_a, tiles in ((False, launch.b_tiles), (True, launch.a_tiles)):
            if tiles.shape[0] == 0:
                continue
            kernel[(tiles.shape[0],)](
                launch.pair_table, table, tiles, scratch[offset : offset + numel], FACTOR_A=factor_a,
                GRAD_SCALE=grad_scale, **launch.constexprs,
                **kernel_config(launch.constexprs["BLOCK_R"], factor_a, update),
            )
        if launch.p_tiles is not None and launch.p_tiles.shape[0]:
            c = launch.constexprs
            jitted(_p_tile_kernel)[(launch.p_tiles.shape[0],)](
                launch.pair_table, table, launch.p_tiles, PARAM_DTYPE=c["PARAM_DTYPE"], U_DTYPE=c["U_DTYPE"],
                BLOCK_R=c["BLOCK_R"], U_PRECISION=c["U_PRECISION"], NATIVE_BF16=c["NATIVE_BF16"],
                **ptile_config(c["BLOCK_R"], c["U_PRECISION"]))
    if prep.reduce_table is not None:
        jitted(_reduce_kernel)[prep.reduce_grid](prep.reduce_table, scratch, scalars[0], BLOCK=REDUCE_BLOCK,
                                                 num_warps=4, num_stages=3, enable_fp_fusion=True)


def _bias_terms(step: float, lr: float, beta1: float, beta2: float) -> list[float]:
    """``[lr / (1 − β₁ᵗ), √(1 − β₂ᵗ)]`` for step ``t``."""
    return [lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step)]


# ---------------------------------------------------------------------------- prepared steps
#
# The contract of the plan (docs/triton.md, "Prepared steps"): ``prepare`` validates a
# bucket's tensors once and builds its device tables; ``step`` then takes only the
# gradients, the per-pair λ scale, each factor's hyperparameters and the GradScaler's
# tensors. A step reads nothing back to the host: the counters are advanced and the bias
# corrections computed by :func:`.kernels._terms_kernel`, and the only host → device copies
# are the pair table (when a gradient's address changed) and the hyperparameter table
# (when a Python-number hyperparameter changed). Steps on CUDA can be captured in a CUDA graph.

#: Fields of the batch a prepared step reads from the handle (the gradients come per step).
_STEP_FIELDS = ("A", "B", "exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B", "P", "G", "M", "U", "Q_B",
                "R_B", "H")


@dataclass
class TritonStep:
    """A bucket's prepared step (:func:`prepare`); opaque to its owner, who drops it when the
    bucket's tensors change (a new one is then prepared)."""

    prep: _Prepared
    count: int
    device: torch.device
    tensors: dict  # the validated per-pair tensors (U as given or a contiguous copy, w as (k,) views)
    counters: Tensor  # (2L,): A's counters then B's, advanced by the step
    hyper: Tensor  # fp64 (2, HYPER_FIELDS): A's then B's hyperparameters, on the device
    scalars: list[Tensor]  # per bucket: fp32 (pairs, SCALAR_FIELDS), written by the terms kernel
    rparts: Tensor  # fp32 (L,): each pair's share of R
    scratch: Tensor  # fp32 partial statistics
    one: Tensor  # fp32 (1,): the gradient scale of a step without one
    zero: Tensor  # fp32 (1,): the found_inf of a step without one
    hyper_key: tuple | None = None  # the Python-number hyperparameters last uploaded


def _as_k_vector(t: Tensor, j: int, k: int, device: torch.device) -> Tensor:
    """``w[j]`` as a contiguous fp32 (k,) view (it may come as (k,) or (k, 1))."""
    if not isinstance(t, Tensor) or t.numel() != k or t.dtype != torch.float32 or t.device != device \
            or not t.is_contiguous():
        what = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
        raise OptimizerInputError(f"triton prepare: w[{j}] must be a contiguous float32 tensor of {k} elements on "
                                  f"{device}; found {what}")
    return t.reshape(k)


def prepare(batch: AnchoredBatch | BucketTensors, counters: Tensor, w: Sequence[Tensor] | Tensor | None = None,
            precision: str | None = None) -> TritonStep:
    """Validate a bucket's tensors once and build what its steps need on the device.

    Args:
        batch: the bucket's pairs: the plan's :class:`BucketTensors` (contract:
            :mod:`asft_kernels.ops`; its views are taken with :meth:`BucketTensors.as_batch`
            and its ``w``), or an :class:`AnchoredBatch` (its gradient and step-counter lists
            are not read). Shapes
            as :func:`fused_step`; ``P``, ``G``, ``M``, ``Q_B``, ``R_B``, ``H`` fp32 contiguous
            (the step writes them in place; views of the plan's stacked buffers are fine).
        counters: (2L,) fp32/fp64 contiguous step counters on the parameters' device, A's
            then B's (a view of the plan's buffer); each step advances them by one.
        w: per pair the (k,) or (k, 1) anchor weights, fp32, or an (L, k, 1) tensor; None
            reads ``batch.w``.
        precision: ``tl.dot`` precision of the U products (:func:`u_precision`).

    Returns:
        The handle :func:`step` takes.

    Raises:
        OptimizerInputError: anything :func:`fused_step` refuses, statistics or terms that
            are not fp32 contiguous, counters or ``w`` of the wrong shape, dtype or device.
    """
    if isinstance(batch, BucketTensors):
        batch, w = batch.as_batch(counters)[0], batch.w if w is None else w
    count = len(batch)
    w = getattr(batch, "w", None) if w is None else w
    if w is None:
        raise OptimizerInputError("triton prepare: no anchor weights w (neither an argument nor batch.w)")
    w = list(w.unbind(0)) if isinstance(w, Tensor) else list(w)
    lists = {name: list(getattr(batch, name)) for name in _STEP_FIELDS}
    _check_lengths({**lists, "w": w}, count, "prepare")
    if count == 0:
        raise OptimizerInputError("triton prepare: the batch has no pairs")
    lists["U"] = [t.contiguous() for t in lists["U"]]
    shapes, device = _check_tensors(lists, _STEP_FIELDS)
    f32 = torch.float32
    lists["w"] = [_as_k_vector(t, j, shapes[j][3], device) for j, t in enumerate(w)]
    if (not isinstance(counters, Tensor) or counters.shape != (2 * count,) or counters.dtype not in
            (torch.float32, torch.float64) or counters.device != device or not counters.is_contiguous()):
        what = (f"{counters.dtype} {tuple(counters.shape)} on {counters.device}" if isinstance(counters, Tensor)
                else type(counters).__name__)
        raise OptimizerInputError(f"triton prepare: counters must be a contiguous float32/float64 tensor of shape "
                                  f"({2 * count},) on {device} (A's then B's step counters); found {what}")
    prep = _prepare(lists, shapes, device, (lists["P"], lists["G"], lists["M"]), update=True, precision=precision)
    return TritonStep(
        prep=prep, count=count, device=device, tensors=lists, counters=counters,
        hyper=torch.zeros((2, int(HYPER_FIELDS)), dtype=torch.float64, device=device),
        scalars=[torch.zeros((len(launch.idx), int(SCALAR_FIELDS)), dtype=f32, device=device)
                 for launch in prep.launches],
        rparts=torch.zeros(count, dtype=f32, device=device),
        scratch=torch.empty(prep.scratch_numel, dtype=f32, device=device),
        one=torch.ones(1, dtype=f32, device=device), zero=torch.zeros(1, dtype=f32, device=device),
    )


def _check_flag(t: Tensor | None, name: str, device: torch.device) -> None:
    if t is not None and (not isinstance(t, Tensor) or t.numel() != 1 or t.device != device
                          or not t.dtype.is_floating_point):
        what = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
        raise OptimizerInputError(f"triton step: {name} must be a one-element float tensor on {device}; found {what}")


def _step_grads(handle: TritonStep, grads: Sequence[Tensor], name: str, shapes: tuple) -> list[Tensor]:
    """The gradients of one factor checked against the prepared shapes and dtypes (contiguous
    copies of strided ones); raises naming the first that does not fit."""
    if len(grads) != handle.count:
        raise OptimizerInputError(f"triton step: {name} has {len(grads)} entries, the batch has {handle.count} pairs")
    dtypes = handle.prep.param_dtypes
    if _fits(grads, shapes, dtypes, handle.device):
        return grads  # the usual case
    out = []
    for j, g in enumerate(grads):
        g = g.contiguous() if isinstance(g, Tensor) else g
        _require(g, name, j, handle.device, shapes[j], dtypes[j])
        out.append(g)
    return out


def _hyper_key(hyper_A: AdamWHyper, hyper_B: AdamWHyper) -> tuple:
    """The Python-number part of both factors' hyperparameters (a tensor lr counts as 0)."""
    return tuple(
        (0.0 if isinstance(h.lr, Tensor) else float(h.lr), float(h.beta1), float(h.beta2), float(h.eps),
         float(h.weight_decay), -1.0 if h.maximize else 1.0)
        for h in (hyper_A, hyper_B))


def step(handle: TritonStep, grad_A: Sequence[Tensor], grad_B: Sequence[Tensor], scale: Tensor,
         hyper_A: AdamWHyper, hyper_B: AdamWHyper, grad_scale: Tensor | None = None,
         found_inf: Tensor | None = None) -> Tensor:
    """One anchored AdamW step of a prepared bucket, without reading anything back to the host.

    Advances the handle's counters by one, computes ``Q_B``, ``R_B``, ``H`` from the cached
    ``P``, ``G``, ``M`` (``2λ = scale[j]``), runs the fused update of every pair with A's
    hyperparameters ``hyper_A`` and B's ``hyper_B`` (``lr`` a number or a 0-d tensor on the
    device), and writes ``P'``, ``G'``, ``M'`` of the stored values.

    Args:
        handle: from :func:`prepare`.
        grad_A, grad_B: per pair, the factors' gradients (their shapes and dtypes).
        scale: (L,) per-pair ``2λ·coef`` (fp32 or fp64) on the device.
        grad_scale: None or a one-element fp32 tensor on the device: the gradients are divided
            by it (the ``.grad`` tensors are not modified).
        found_inf: None or a one-element fp32 tensor on the device: when it is not 0 nothing
            is written (parameters, moments, counters, statistics), as torch's fused AdamW
            skips a step.

    Returns:
        ``R = ½ Σ_j ⟨H_j, M_j⟩``, 0-d fp32, at the statistics before the step.

    Raises:
        OptimizerInputError: gradients, ``scale`` or the GradScaler tensors that do not fit
            (before anything is written).
    """
    grad_A = _step_grads(handle, grad_A, "grad_A", handle.prep.a_shapes)
    grad_B = _step_grads(handle, grad_B, "grad_B", handle.prep.b_shapes)
    if (not isinstance(scale, Tensor) or scale.shape != (handle.count,) or scale.device != handle.device
            or not scale.dtype.is_floating_point):
        what = f"{scale.dtype} {tuple(scale.shape)} on {scale.device}" if isinstance(scale, Tensor) else \
            type(scale).__name__
        raise OptimizerInputError(f"triton step: scale must be a float tensor of shape ({handle.count},) on "
                                  f"{handle.device}; found {what}")
    _check_flag(grad_scale, "grad_scale", handle.device)
    _check_flag(found_inf, "found_inf", handle.device)
    for h, name in ((hyper_A, "hyper_A"), (hyper_B, "hyper_B")):
        if isinstance(h.lr, Tensor):
            _check_flag(h.lr, f"{name}.lr", handle.device)
    key = _hyper_key(hyper_A, hyper_B)
    if key != handle.hyper_key:
        handle.hyper.copy_(_upload(list(key), torch.float64, handle.device))
        handle.hyper_key = key
    for f, h in enumerate((hyper_A, hyper_B)):
        if isinstance(h.lr, Tensor):
            handle.hyper[f, int(_LR)].copy_(h.lr.reshape(()))
    prep = handle.prep
    for launch, table in zip(prep.launches, handle.scalars):
        _set_grad_ptrs(launch, grad_A, grad_B, handle.device)
        block_r = launch.constexprs["BLOCK_R"]
        jitted(_terms_kernel)[(len(launch.idx),)](
            launch.pair_table, handle.counters, handle.hyper, scale,
            handle.one if grad_scale is None else grad_scale, handle.zero if found_inf is None else found_inf,
            table, handle.rparts, handle.count, BLOCK_R=block_r, **terms_config(block_r))
    _launch(prep, handle.scalars, handle.scratch, grad_scale=grad_scale is not None)
    return handle.rparts.sum()


def _register_cuda_impls() -> None:
    """Make ``torch.ops.asft.*`` dispatch CUDA tensors to these kernels."""
    for name, fn in (("stats_pass", stats_pass), ("fused_anchored_adamw_", op_kernel(fused_step))):
        try:
            _lib.impl(name, fn, "CUDA")
        except RuntimeError:
            pass  # already registered (module reloaded)


_register_cuda_impls()
