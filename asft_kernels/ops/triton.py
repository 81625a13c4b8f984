"""Triton backend: the statistics pass and the one-pass fused anchored AdamW step.

Implements the contract of :mod:`asft_kernels.ops.schema` for CUDA tensors (and for CPU
tensors under the Triton interpreter, ``TRITON_INTERPRET=1``, used by the tests).

Math (docs/method.md, per pair ``j``; ``Q_B = 2λ M``, ``R_B = 2λ diag(w) P M``,
``H = 2λ (G − Pᵀ diag(w) P)`` come precomputed from the optimizer)::

    rows of B (m, r):       g = grad_B + B Q_B − U R_B          U: (m, k)
    column blocks of A:     g = grad_A + H A                    A: (r, n)
    both:                   AdamW exactly as torch.optim.AdamW (decoupled weight decay)
    next statistics:        P' = Uᵀ B',  G' = B'ᵀ B',  M' = A' A'ᵀ   (from the stored B', A')

Layout of the work:

* one kernel, :func:`_factor_kernel`, specialised by the constexpr ``FACTOR_A``: a
  program owns a *strip* of consecutive blocks (``BLOCK_ROWS`` rows of one B, or
  ``BLOCK_COLS`` columns of one A); with ``UPDATE`` it applies the anchoring gradient and
  AdamW, and it accumulates the strip's partial statistics in registers (P and G for B,
  M for A) and writes them once to a scratch buffer; with ``UPDATE=False`` it only
  computes the statistics (the stats pass). The strip length balances the number of
  programs, the partials to write, and keeping the strip's U in cache for B's second
  phase (:func:`strip_blocks`);
* :func:`_reduce_kernel` sums the partials of every pair in a fixed order (strip 0, 1,
  …), so results are bitwise reproducible on a given GPU: no atomics anywhere;
* all pairs of a batch go in the same launches: each program reads its pair's tensor
  addresses from an int64 table and casts them with ``.to(tl.pointer_type(...))``.
  Pairs are bucketed by (parameter dtype, U dtype, padded rank 16 or 64); a step costs
  two launches per bucket plus one reduction launch.

Parameters fp32/bf16/fp16 keep fp32 optimizer state and compute in fp32; ``U`` may be
fp32, bf16, fp16 or fp64 (converted to fp32 on load). fp64 parameters are delegated to
the eager implementation (:mod:`.eager`): Triton's fp64 dot products are slow and fp64
training is a reference setting, not a performance one. Ranks above
:data:`MAX_TRITON_RANK` are delegated to eager as well (the r×r tiles would spill
registers). Hyperparameters (lr, betas, eps, weight decay, the bias corrections) are
runtime arguments: a scheduler changing lr never triggers a recompile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import OptimizerInputError
from . import eager
from .schema import _lib

# Largest LoRA rank handled by the kernels; larger ranks use the eager implementation
# (at r = 128 the r×r tiles spill registers even at the smallest tile).
MAX_TRITON_RANK = 64
# fp32 tl.dot precision: "ieee" keeps results within ~1e-6 of the reference (tf32 would not).
DOT_PRECISION = "ieee"

# Fields of one row of the pair table (int64): addresses, then sizes. Kernel-visible
# globals must be ``tl.constexpr``; they index host lists as ints too.
_C = tl.constexpr
_B, _GRAD_B, _EXP_AVG_B, _EXP_AVG_SQ_B, _U, _Q_B, _R_B = (_C(i) for i in range(7))
_A, _GRAD_A, _EXP_AVG_A, _EXP_AVG_SQ_A, _H = (_C(i) for i in range(7, 12))
_M_ROWS, _N_COLS, _RANK, _K = (_C(i) for i in range(12, 16))
PAIR_FIELDS = _C(16)
# Fields of one row of the per-pair float table (fp32): bias corrections.
_STEP_SIZE_B, _BC2_SQRT_B, _STEP_SIZE_A, _BC2_SQRT_A = (_C(i) for i in range(4))
SCALAR_FIELDS = _C(4)
# Fields of one row of a tile table (int64): pair index, first row/column, number of
# blocks, scratch offset.
TILE_FIELDS = _C(4)
# Fields of one row of the reduction table (int64).
REDUCE_FIELDS = _C(5)
REDUCE_BLOCK = 256


def is_available() -> bool:
    """True when Triton imports and can run here: a CUDA device is present, or the Triton
    interpreter is switched on (``TRITON_INTERPRET=1``, CPU tensors)."""
    return torch.cuda.is_available() or _interpreting()


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


# ---------------------------------------------------------------------------- kernels
# The kernels are plain functions wrapped by ``triton.jit`` on first launch (see
# ``jitted``): Triton decides at decoration time whether a function is compiled or
# interpreted, and tests switch the interpreter on after this module is imported.


def _factor_kernel(
    pairs,  # int64 (n_pairs, PAIR_FIELDS): addresses and sizes
    scalars,  # fp32 (n_pairs, SCALAR_FIELDS): lr/(1−β₁ᵗ) and √(1−β₂ᵗ) per factor
    tiles,  # int64 (n_programs, TILE_FIELDS): pair, first row/column, blocks, scratch offset
    scratch,  # fp32: partial statistics, one block per program
    decay,  # 1 − lr·weight_decay
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    grad_sign,  # −1 for maximize, else +1
    PARAM_DTYPE: tl.constexpr,
    U_DTYPE: tl.constexpr,
    FACTOR_A: tl.constexpr,
    UPDATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One strip of one pair: anchoring gradient + AdamW (``UPDATE``) and partial statistics.

    A program walks ``n_blocks`` consecutive blocks of its pair (a *strip*).

    * A (r, n), blocks of ``BLOCK_COLS`` columns: ``g = grad_A + H A``, AdamW, and
      ``M_s = A' A'ᵀ`` (r, r) of the strip, accumulated in registers.
    * B (m, r), blocks of ``BLOCK_ROWS`` rows. Phase 1, per block: ``g = grad_B + B Q_B −
      U R_B`` (U swept in chunks of ``BLOCK_K`` columns), AdamW, store, and ``G_s += B'ᵀ B'``.
      Phase 2, per chunk of ``BLOCK_K`` columns of U: ``P_s[chunk] = Σ_blocks U[rows, chunk]ᵀ
      B'[rows]``, reading back the B' just stored. The strip's U was read in phase 1 and is
      sized to stay in cache, so U comes from DRAM once.

    Partials go to the program's scratch block: ``P_s`` (k, r) then ``G_s`` (r, r) for B,
    ``M_s`` (r, r) for A. All math in fp32; the statistics use the values as stored
    (rounded to the parameter dtype).
    """
    program = tl.program_id(0)
    pair = tl.load(tiles + program * TILE_FIELDS)
    start = tl.load(tiles + program * TILE_FIELDS + 1)
    n_blocks = tl.load(tiles + program * TILE_FIELDS + 2)
    out = tl.load(tiles + program * TILE_FIELDS + 3)
    row = pairs + pair * PAIR_FIELDS
    r = tl.load(row + _RANK)
    m = tl.load(row + _M_ROWS)
    n = tl.load(row + _N_COLS)
    k = tl.load(row + _K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    # r×r matrices are row-major (contiguous).
    rr_idx = offs_r[:, None] * r + offs_r[None, :]
    rr_mask = mask_r[:, None] & mask_r[None, :]
    offs_k = tl.arange(0, BLOCK_K)
    if FACTOR_A:
        param_ptr = tl.load(row + _A).to(tl.pointer_type(PARAM_DTYPE))
        grad_ptr = tl.load(row + _GRAD_A).to(tl.pointer_type(PARAM_DTYPE))
        exp_avg_ptr = tl.load(row + _EXP_AVG_A).to(tl.pointer_type(tl.float32))
        exp_avg_sq_ptr = tl.load(row + _EXP_AVG_SQ_A).to(tl.pointer_type(tl.float32))
        step_size = tl.load(scalars + pair * SCALAR_FIELDS + _STEP_SIZE_A)
        bc2_sqrt = tl.load(scalars + pair * SCALAR_FIELDS + _BC2_SQRT_A)
        mix_ptr = tl.load(row + _H).to(tl.pointer_type(tl.float32))
    else:
        param_ptr = tl.load(row + _B).to(tl.pointer_type(PARAM_DTYPE))
        grad_ptr = tl.load(row + _GRAD_B).to(tl.pointer_type(PARAM_DTYPE))
        exp_avg_ptr = tl.load(row + _EXP_AVG_B).to(tl.pointer_type(tl.float32))
        exp_avg_sq_ptr = tl.load(row + _EXP_AVG_SQ_B).to(tl.pointer_type(tl.float32))
        step_size = tl.load(scalars + pair * SCALAR_FIELDS + _STEP_SIZE_B)
        bc2_sqrt = tl.load(scalars + pair * SCALAR_FIELDS + _BC2_SQRT_B)
        mix_ptr = tl.load(row + _Q_B).to(tl.pointer_type(tl.float32))
        u_base = tl.load(row + _U).to(tl.pointer_type(U_DTYPE))
        rb_ptr = tl.load(row + _R_B).to(tl.pointer_type(tl.float32))
    if UPDATE:
        mix = tl.load(mix_ptr + rr_idx, mask=rr_mask, other=0.0)  # H (A) or Q_B (B)
    acc_stat = tl.full((BLOCK_R, BLOCK_R), 0.0, tl.float32)  # M (A) or G (B) of the strip

    for blk in range(0, n_blocks):
        if FACTOR_A:
            offs_c = start + blk * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
            idx = offs_r[:, None] * n + offs_c[None, :]  # (BLOCK_R, BLOCK_COLS)
            mask = mask_r[:, None] & (offs_c < n)[None, :]
        else:
            offs_m = start + blk * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            mask_m = offs_m < m
            idx = offs_m[:, None] * r + offs_r[None, :]  # (BLOCK_ROWS, BLOCK_R)
            mask = mask_m[:, None] & mask_r[None, :]
        x = tl.load(param_ptr + idx, mask=mask, other=0.0).to(tl.float32)

        if UPDATE:
            g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            if FACTOR_A:
                g = g + tl.dot(mix, x, input_precision=DOT_PRECISION)
            else:
                g = g + tl.dot(x, mix, input_precision=DOT_PRECISION)
                u_rb = tl.full((BLOCK_ROWS, BLOCK_R), 0.0, tl.float32)
                for k0 in range(0, k, BLOCK_K):
                    ck = k0 + offs_k
                    u = tl.load(u_base + offs_m[:, None] * k + ck[None, :],
                                mask=mask_m[:, None] & (ck < k)[None, :], other=0.0).to(tl.float32)
                    rb = tl.load(rb_ptr + ck[:, None] * r + offs_r[None, :],
                                 mask=(ck < k)[:, None] & mask_r[None, :], other=0.0)
                    u_rb = tl.dot(u, rb, u_rb, input_precision=DOT_PRECISION)
                g = g - u_rb
            # AdamW, operation by operation as torch.optim.AdamW (single-tensor path).
            g = g * grad_sign
            exp_avg = tl.load(exp_avg_ptr + idx, mask=mask, other=0.0)
            exp_avg_sq = tl.load(exp_avg_sq_ptr + idx, mask=mask, other=0.0)
            x = x * decay
            exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
            exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * g * g
            denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bc2_sqrt) + eps
            x = x - step_size * tl.div_rn(exp_avg, denom)
            tl.store(exp_avg_ptr + idx, exp_avg, mask=mask)
            tl.store(exp_avg_sq_ptr + idx, exp_avg_sq, mask=mask)
            if PARAM_DTYPE == tl.bfloat16:
                # Round to nearest even explicitly: the interpreter's fp32 -> bf16 cast truncates.
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)
            stored = x.to(PARAM_DTYPE)
            tl.store(param_ptr + idx, stored, mask=mask)
            # The statistics describe the parameters as stored, after rounding.
            x = tl.where(mask, stored.to(tl.float32), 0.0)

        if FACTOR_A:
            acc_stat = tl.dot(x, tl.trans(x), acc_stat, input_precision=DOT_PRECISION)
        else:
            acc_stat = tl.dot(tl.trans(x), x, acc_stat, input_precision=DOT_PRECISION)

    if FACTOR_A:
        tl.store(scratch + out + rr_idx, acc_stat, mask=rr_mask)
    else:
        tl.store(scratch + out + k * r + rr_idx, acc_stat, mask=rr_mask)
        # Phase 2 reads back rows of B' stored by other threads of this program.
        tl.debug_barrier()
        for k0 in range(0, k, BLOCK_K):
            ck = k0 + offs_k
            acc_p = tl.full((BLOCK_K, BLOCK_R), 0.0, tl.float32)
            for blk in range(0, n_blocks):
                offs_m = start + blk * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
                mask_m = offs_m < m
                x = tl.load(param_ptr + offs_m[:, None] * r + offs_r[None, :],
                            mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
                u = tl.load(u_base + offs_m[:, None] * k + ck[None, :],
                            mask=mask_m[:, None] & (ck < k)[None, :], other=0.0).to(tl.float32)
                acc_p = tl.dot(tl.trans(u), x, acc_p, input_precision=DOT_PRECISION)
            tl.store(scratch + out + ck[:, None] * r + offs_r[None, :], acc_p,
                     mask=(ck < k)[:, None] & mask_r[None, :])


def _reduce_kernel(
    jobs,  # int64 (n_jobs, REDUCE_FIELDS): destination address, source offset, tile stride, numel, n_tiles
    scratch,  # fp32 partial statistics
    BLOCK: tl.constexpr,
):
    """``dest[e] = Σ_t scratch[src + t·stride + e]`` for ``t = 0, 1, …`` in that order
    (deterministic: no atomics, a fixed summation order)."""
    job = tl.program_id(0)
    block = tl.program_id(1)
    base = jobs + job * REDUCE_FIELDS
    dest = tl.load(base).to(tl.pointer_type(tl.float32))
    src = tl.load(base + 1)
    stride = tl.load(base + 2)
    numel = tl.load(base + 3)
    n_tiles = tl.load(base + 4)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    # Blocks past the end of a small output do no work.
    n_tiles = tl.where(block * BLOCK < numel, n_tiles, 0)
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    for t in range(0, n_tiles):
        acc += tl.load(scratch + src + t * stride + offs, mask=mask, other=0.0)
    tl.store(dest + offs, acc, mask=mask)


_JIT_CACHE: dict[tuple[str, bool], object] = {}


def jitted(fn):
    """``triton.jit(fn)`` for the current mode (compiled, or interpreted when
    ``TRITON_INTERPRET=1``), created once per mode."""
    key = (fn.__name__, _interpreting())
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = triton.jit(fn)
    return _JIT_CACHE[key]


# ---------------------------------------------------------------------------- config


def kernel_config(block_r: int, factor_a: bool, update: bool = True) -> dict:
    """Default launch configuration of :func:`_factor_kernel` for a padded rank ``block_r``
    (16 or 64): block sizes and the launch options ``num_warps``, ``enable_fp_fusion`` and,
    for the stats pass, ``maxnreg``.

    fp32 ``tl.dot`` with ``ieee`` precision runs on FMA units and keeps its operands in
    registers, so blocks are small. These are configurations that compile without spilling
    to local memory for sm_80 and sm_90 (checked by ``tests/test_triton_aot.py``; figures
    in docs/triton.md). ptxas picks 64 registers for the 16-warp stats variant and spills,
    so the stats pass states the per-thread share of the register file explicitly.
    """
    if factor_a:
        cols, warps = {16: (64, 8), 64: (16, 16)}[block_r]
        cfg = dict(BLOCK_ROWS=16, BLOCK_K=16, BLOCK_COLS=cols, num_warps=warps)
    else:
        rows, warps = {16: (32, 4), 64: (16, 16)}[block_r]
        cfg = dict(BLOCK_ROWS=rows, BLOCK_K=16, BLOCK_COLS=16, num_warps=warps)
    if not update:
        cfg["maxnreg"] = min(255, 65536 // (32 * cfg["num_warps"]))
    # Stated explicitly: Triton 3.10 changes the default to no mul-add fusion.
    cfg["enable_fp_fusion"] = True
    return cfg


def padded_rank(r: int) -> int:
    """Rank padded to the kernels' block: 16 (``tl.dot``'s minimum) for r ≤ 16, else 64.
    (A 32 block spills registers for B at every tile size tried; see docs/triton.md.)"""
    return 16 if r <= 16 else 64


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}


# ---------------------------------------------------------------------------- launchers


# Bytes of U one B strip may cover: phase 2 re-reads them, and they must still be in
# cache (L1/L2) by then.
U_STRIP_BYTES = 128 * 1024


def _programs_target(device: torch.device) -> int:
    """Programs per launch worth aiming for: a few per SM (few under the interpreter, so
    that the tests exercise strips of several blocks)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def strip_blocks(total_blocks: int, target_programs: int, block_bytes: int = 0, partial_bytes: int = 0) -> int:
    """Blocks per strip.

    Long strips mean fewer partial statistics to write and sum, but at least
    ``target_programs`` programs should remain. For B (``block_bytes``: bytes of U in one
    block, ``partial_bytes``: bytes of one strip's partial P and G), a strip whose U fits
    :data:`U_STRIP_BYTES` is re-read from cache in phase 2; a longer one is re-read from
    DRAM, which is chosen only when that costs less than the extra partials.
    """
    blocks = max(1, total_blocks // max(1, target_programs))
    if block_bytes:
        fit = max(1, U_STRIP_BYTES // block_bytes)
        if fit < blocks:
            # DRAM bytes per block: partials written + read, plus U again if it overflows cache
            cost_fit = 2 * partial_bytes / fit + (block_bytes if block_bytes > U_STRIP_BYTES else 0)
            cost_long = 2 * partial_bytes / blocks + block_bytes
            if cost_fit <= cost_long:
                blocks = fit
    return blocks


@lru_cache(maxsize=256)
def _layout(shapes: tuple, block_r: int, u_bytes: int, device: torch.device):
    """Strip tables and scratch offsets for a bucket of pairs with ``shapes`` ((m, n, r, k), …).

    Returns ``(b_tiles, a_tiles, p_spans, m_spans, scratch_numel)``: device int64 strip
    tables (rows ``(pair, first row/column, blocks, scratch offset)``), per pair
    ``(offset, strip_stride, n_strips)`` of its B and A partials, and the scratch size
    (fp32 elements). Cached: it depends only on the shapes.
    """
    cfg_b, cfg_a = kernel_config(block_r, False), kernel_config(block_r, True)
    rows_b, cols_a = cfg_b["BLOCK_ROWS"], cfg_a["BLOCK_COLS"]
    target = _programs_target(device)
    max_k = max(k for _, _, _, k in shapes)
    max_r = max(r for _, _, r, _ in shapes)
    per_b = strip_blocks(sum(triton.cdiv(m, rows_b) for m, _, _, _ in shapes), target, rows_b * max_k * u_bytes,
                         4 * (max_k * max_r + max_r * max_r))
    per_a = strip_blocks(sum(triton.cdiv(n, cols_a) for _, n, _, _ in shapes), target)
    b_rows, a_rows, p_spans, m_spans = [], [], [], []
    offset = 0
    for j, (m, _n, r, k) in enumerate(shapes):
        stride = k * r + r * r
        blocks = triton.cdiv(m, rows_b)
        strips = triton.cdiv(blocks, per_b)
        p_spans.append((offset, stride, strips))
        for t in range(strips):
            b_rows.append((j, t * per_b * rows_b, min(per_b, blocks - t * per_b), offset + t * stride))
        offset += strips * stride
    for j, (_m, n, r, _k) in enumerate(shapes):
        stride = r * r
        blocks = triton.cdiv(n, cols_a)
        strips = triton.cdiv(blocks, per_a)
        m_spans.append((offset, stride, strips))
        for t in range(strips):
            a_rows.append((j, t * per_a * cols_a, min(per_a, blocks - t * per_a), offset + t * stride))
        offset += strips * stride
    b_tiles = torch.tensor(b_rows, dtype=torch.int64).reshape(-1, int(TILE_FIELDS)).to(device)
    a_tiles = torch.tensor(a_rows, dtype=torch.int64).reshape(-1, int(TILE_FIELDS)).to(device)
    return b_tiles, a_tiles, tuple(p_spans), tuple(m_spans), offset


def predicted_step_bytes(
    shapes: Sequence[tuple[int, int, int, int]], param_bytes: int, u_bytes: int, sm_count: int
) -> dict[str, float]:
    """DRAM bytes of one fused step under this backend's layout, and the floor.

    Args:
        shapes: ``(m, n, r, k)`` per pair. param_bytes: 4 (fp32), 2 (bf16/fp16).
        u_bytes: bytes per element of U. sm_count: streaming multiprocessors of the GPU.

    Returns:
        ``floor``: plain AdamW bytes on A and B (read param, grad, two moments; write param,
        two moments) + one read of U + the statistics; ``fused``: the same plus the partial
        statistics written and read back and the small ``Q_B``/``R_B``/``H`` reads, with U
        read once where the strip's U fits :data:`U_STRIP_BYTES` (phase 2 hits cache) and
        twice where the layout chose longer strips; ``fused_u_twice``: every U read twice
        (phase 2 missing cache everywhere); ``partials``: bytes of partial statistics written.
    """
    shapes = [tuple(int(v) for v in s) for s in shapes]
    floor = fused = partials = u_total = 0.0
    buckets: dict[int, list] = {}
    for shape in shapes:
        buckets.setdefault(padded_rank(shape[2]), []).append(shape)
    for block_r, group in buckets.items():
        rows_b = kernel_config(block_r, False)["BLOCK_ROWS"]
        cols_a = kernel_config(block_r, True)["BLOCK_COLS"]
        max_k = max(k for _, _, _, k in group)
        max_r = max(r for _, _, r, _ in group)
        block_bytes = rows_b * max_k * u_bytes
        per_b = strip_blocks(sum(-(-m // rows_b) for m, _, _, _ in group), 4 * sm_count, block_bytes,
                             4 * (max_k * max_r + max_r * max_r))
        u_again = per_b * block_bytes > U_STRIP_BYTES
        per_a = strip_blocks(sum(-(-n // cols_a) for _, n, _, _ in group), 4 * sm_count)
        for m, n, r, k in group:
            adamw = (3 * param_bytes + 16) * (m * r + r * n)
            stats = 4 * (k * r + 2 * r * r)
            u_read = u_bytes * m * k
            part = 4 * (-(-m // (rows_b * per_b)) * (k * r + r * r) + -(-n // (cols_a * per_a)) * r * r)
            floor += adamw + u_read + stats
            fused += adamw + u_read * (2 if u_again else 1) + stats + 2 * part + 4 * (2 * r * r + k * r)
            partials += part
            u_total += 0 if u_again else u_read
    return {"floor": floor, "fused": fused, "fused_u_twice": fused + u_total, "partials": partials}


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
    if B.dtype != A.dtype or B.dtype not in _TL_DTYPES:
        raise OptimizerInputError(f"triton: A[{j}] and B[{j}] must share a float dtype; found {A.dtype} and {B.dtype}")
    if U.dtype not in _TL_DTYPES:
        raise OptimizerInputError(f"triton: U[{j}] must be a float tensor, found {U.dtype}")
    return m, n, r, k


def _buckets(U: Sequence[Tensor], B: Sequence[Tensor]) -> dict[tuple, list[int]]:
    """Pair indices grouped by (param dtype, U dtype, padded rank): one launch each."""
    groups: dict[tuple, list[int]] = {}
    for j, (u, b) in enumerate(zip(U, B)):
        groups.setdefault((b.dtype, u.dtype, padded_rank(b.shape[1])), []).append(j)
    return groups


def _pair_table(rows: list[list[int]], device: torch.device) -> Tensor:
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, int(PAIR_FIELDS)).to(device)


_TABLE_FIELDS = ((_B, "B"), (_GRAD_B, "grad_B"), (_EXP_AVG_B, "exp_avg_B"), (_EXP_AVG_SQ_B, "exp_avg_sq_B"),
                 (_U, "U"), (_Q_B, "Q_B"), (_R_B, "R_B"), (_A, "A"), (_GRAD_A, "grad_A"),
                 (_EXP_AVG_A, "exp_avg_A"), (_EXP_AVG_SQ_A, "exp_avg_sq_A"), (_H, "H"))


def _run(
    pairs: list[int],
    tensors: dict,
    shapes: list[tuple[int, int, int, int]],
    outputs: tuple[dict, dict, dict],
    hyper: tuple,
    update: bool,
    device: torch.device,
    scalars: dict[int, list[float]] | None = None,
) -> None:
    """Launch the factor kernel for every bucket of ``pairs``, then one reduction.

    ``tensors`` maps contract names (``"B"``, ``"grad_B"``, …) to per-pair lists;
    ``outputs`` are the fp32 contiguous ``P``, ``G``, ``M`` to fill, keyed by pair index;
    ``scalars`` the per-pair ``[step_size_B, bc2_sqrt_B, step_size_A, bc2_sqrt_A]``.
    """
    plans, total = [], 0
    for (pdt, udt, block_r), local in _buckets([tensors["U"][j] for j in pairs],
                                               [tensors["B"][j] for j in pairs]).items():
        idx = [pairs[i] for i in local]
        layout = _layout(tuple(shapes[j] for j in idx), block_r, udt.itemsize, device)
        plans.append((pdt, udt, block_r, idx, layout, total))
        total += layout[4]
    scratch = torch.empty(total, dtype=torch.float32, device=device)
    kernel = jitted(_factor_kernel)
    jobs = []
    for pdt, udt, block_r, idx, (b_tiles, a_tiles, p_spans, m_spans, numel), base in plans:
        rows = []
        for j in idx:
            row = [0] * int(PAIR_FIELDS)
            for field, name in _TABLE_FIELDS:
                if name in tensors:
                    row[field] = tensors[name][j].data_ptr()
            row[_M_ROWS], row[_N_COLS], row[_RANK], row[_K] = shapes[j]
            rows.append(row)
        pair_table = _pair_table(rows, device)
        if scalars is None:
            scalar_table = torch.zeros((len(idx), int(SCALAR_FIELDS)), dtype=torch.float32, device=device)
        else:
            scalar_table = torch.tensor([scalars[j] for j in idx], dtype=torch.float32).to(device)
        bucket_scratch = scratch[base : base + numel]
        for factor_a, tiles in ((False, b_tiles), (True, a_tiles)):
            if tiles.shape[0] == 0:
                continue
            kernel[(tiles.shape[0],)](
                pair_table, scalar_table, tiles, bucket_scratch, *hyper,
                PARAM_DTYPE=_TL_DTYPES[pdt], U_DTYPE=_TL_DTYPES[udt], FACTOR_A=factor_a, UPDATE=update,
                BLOCK_R=block_r, DOT_PRECISION=DOT_PRECISION, **kernel_config(block_r, factor_a, update),
            )
        for local, j in enumerate(idx):
            m, n, r, k = shapes[j]
            p_off, p_stride, p_tiles = p_spans[local]
            m_off, m_stride, m_tiles = m_spans[local]
            if k > 0:
                jobs.append((outputs[0][j], base + p_off, p_stride, k * r, p_tiles))
            jobs.append((outputs[1][j], base + p_off + k * r, p_stride, r * r, p_tiles))
            jobs.append((outputs[2][j], base + m_off, m_stride, r * r, m_tiles))
    _reduce(jobs, scratch, device)


def _reduce(jobs: list[tuple[Tensor, int, int, int, int]], scratch: Tensor, device: torch.device) -> None:
    """One launch summing every output's partials; a job is ``(dest, offset, tile_stride,
    numel, n_tiles)`` with offsets in fp32 elements of ``scratch``."""
    if not jobs:
        return
    rows = [(dest.data_ptr(), offset, stride, numel, n_tiles) for dest, offset, stride, numel, n_tiles in jobs]
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, int(REDUCE_FIELDS)).to(device)
    grid = (len(rows), triton.cdiv(max(row[3] for row in rows), REDUCE_BLOCK))
    jitted(_reduce_kernel)[grid](table, scratch, BLOCK=REDUCE_BLOCK, num_warps=4, enable_fp_fusion=True)


def _output(t: Tensor) -> Tensor:
    """A contiguous fp32 tensor to reduce into (``t`` itself when it already is one)."""
    if t.is_contiguous() and t.dtype == torch.float32:
        return t
    return torch.empty(t.shape, dtype=torch.float32, device=t.device)


def _triton_eligible(B: Tensor) -> bool:
    return B.dtype != torch.float64 and B.shape[1] <= MAX_TRITON_RANK


def _require(t: Tensor, name: str, j: int, device: torch.device, shape=None, dtype=None) -> None:
    if t.device != device:
        raise OptimizerInputError(f"triton: {name}[{j}] is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise OptimizerInputError(f"triton: {name}[{j}] {tuple(t.shape)} must be contiguous")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise OptimizerInputError(f"triton: {name}[{j}] has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise OptimizerInputError(f"triton: {name}[{j}] is {t.dtype}, expected {dtype}")


def stats_pass(
    U: Sequence[Tensor], B: Sequence[Tensor], A: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Statistics of each pair from the stored parameters, in grouped launches.

    Args:
        U: per pair (m, k) basis (fp32/bf16/fp16/fp64). B: per pair (m, r). A: per pair (r, n).

    Returns:
        ``(P, G, M)`` lists: ``P = Uᵀ B`` (k, r), ``G = Bᵀ B`` (r, r), ``M = A Aᵀ`` (r, r),
        fp32 (fp64, via the eager implementation, for fp64 parameters).

    Raises:
        OptimizerInputError: mismatched shapes, dtypes, or tensors on a device the backend
            cannot run (CUDA, or CPU under ``TRITON_INTERPRET=1``).
    """
    if not (len(U) == len(B) == len(A)):
        raise OptimizerInputError(f"triton stats_pass: {len(U)} U, {len(B)} B and {len(A)} A tensors")
    shapes = [_check_pair(j, u, b, a) for j, (u, b, a) in enumerate(zip(U, B, A))]
    fast = [j for j in range(len(B)) if _triton_eligible(B[j])]
    slow = [j for j in range(len(B)) if not _triton_eligible(B[j])]
    outputs: tuple[dict, dict, dict] = ({}, {}, {})
    if fast:
        device = _check_device([B[j] for j in fast], "B")
        # Read-only inputs: a contiguous copy is as good as the original.
        U, B, A = ([t.contiguous() for t in ts] for ts in (U, B, A))
        for j in fast:
            for t, name in ((U[j], "U"), (B[j], "B"), (A[j], "A")):
                _require(t, name, j, device)
            m, n, r, k = shapes[j]
            for out, shape in zip(outputs, ((k, r), (r, r), (r, r))):
                out[j] = torch.empty(shape, dtype=torch.float32, device=device)
        # AdamW hyperparameters are unused without UPDATE.
        _run(fast, {"U": U, "B": B, "A": A}, shapes, outputs, (1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0), False, device)
    if slow:
        sel = lambda xs: [xs[j] for j in slow]
        for out, values in zip(outputs, eager.stats_pass_impl(sel(U), sel(B), sel(A))):
            out.update(zip(slow, values))
    return tuple([out[j] for j in range(len(B))] for out in outputs)


def fused_step(
    A: Sequence[Tensor],
    B: Sequence[Tensor],
    exp_avg_A: Sequence[Tensor],
    exp_avg_sq_A: Sequence[Tensor],
    exp_avg_B: Sequence[Tensor],
    exp_avg_sq_B: Sequence[Tensor],
    P: Sequence[Tensor],
    G: Sequence[Tensor],
    M: Sequence[Tensor],
    grad_A: Sequence[Tensor],
    grad_B: Sequence[Tensor],
    U: Sequence[Tensor],
    Q_B: Sequence[Tensor],
    R_B: Sequence[Tensor],
    H: Sequence[Tensor],
    step_A: Sequence[float],
    step_B: Sequence[float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Anchored AdamW step for a batch of pairs in grouped launches (contract:
    :mod:`asft_kernels.ops.schema`).

    Shapes per pair: ``A``, ``grad_A``, ``exp_avg*_A``: (r, n); ``B``, ``grad_B``,
    ``exp_avg*_B``: (m, r); ``U``: (m, k); ``P``, ``R_B``: (k, r); ``G``, ``M``, ``Q_B``,
    ``H``: (r, r). Optimizer state and statistics fp32; ``step_*`` already incremented;
    ``lr`` in parameter units per step. Updates ``A``, ``B``, the moments, and ``P``, ``G``,
    ``M`` (the statistics of the stored new parameters) in place. fp64 pairs and ranks above
    :data:`MAX_TRITON_RANK` run the eager implementation.

    Raises:
        OptimizerInputError: inconsistent shapes/dtypes/devices, or non-contiguous inputs;
            raised before anything is written.
    """
    lists = dict(A=A, B=B, exp_avg_A=exp_avg_A, exp_avg_sq_A=exp_avg_sq_A, exp_avg_B=exp_avg_B,
                 exp_avg_sq_B=exp_avg_sq_B, P=P, G=G, M=M, grad_A=grad_A, grad_B=grad_B, U=U, Q_B=Q_B,
                 R_B=R_B, H=H, step_A=step_A, step_B=step_B)
    count = len(A)
    for name, values in lists.items():
        if len(values) != count:
            raise OptimizerInputError(f"triton fused_step: {name} has {len(values)} entries, A has {count}")
    # Read-only inputs: a contiguous copy is as good as the original.
    for name in ("grad_A", "grad_B", "U", "Q_B", "R_B", "H"):
        lists[name] = [t.contiguous() for t in lists[name]]
    U = lists["U"]
    shapes = [_check_pair(j, U[j], B[j], A[j]) for j in range(count)]
    fast = [j for j in range(count) if _triton_eligible(B[j])]
    slow = [j for j in range(count) if not _triton_eligible(B[j])]
    device = _check_device([B[j] for j in fast], "B") if fast else None
    f32 = torch.float32
    for j in fast:
        m, n, r, k = shapes[j]
        for name, shape, dtype in (
            ("A", (r, n), None), ("B", (m, r), None), ("grad_A", (r, n), B[j].dtype),
            ("grad_B", (m, r), B[j].dtype), ("exp_avg_A", (r, n), f32), ("exp_avg_sq_A", (r, n), f32),
            ("exp_avg_B", (m, r), f32), ("exp_avg_sq_B", (m, r), f32), ("U", (m, k), None),
            ("Q_B", (r, r), f32), ("R_B", (k, r), f32), ("H", (r, r), f32),
        ):
            _require(lists[name][j], name, j, device, shape, dtype)
        for name, shape in (("P", (k, r)), ("G", (r, r)), ("M", (r, r))):
            t = lists[name][j]
            if tuple(t.shape) != shape or t.device != device:
                raise OptimizerInputError(
                    f"triton: {name}[{j}] is {tuple(t.shape)} on {t.device}, expected {shape} on {device}")
    if slow:
        sel = lambda xs: [xs[j] for j in slow]
        eager.fused_step_impl(*(sel(v) for v in lists.values()), lr, beta1, beta2, eps, weight_decay, maximize)
    if not fast:
        return
    # Scalars in double precision on the host, as torch.optim.AdamW computes them.
    hyper = (1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, -1.0 if maximize else 1.0)
    scalars = {j: _bias_terms(step_B[j], lr, beta1, beta2) + _bias_terms(step_A[j], lr, beta1, beta2) for j in fast}
    outputs = tuple({j: _output(stat[j]) for j in fast} for stat in (P, G, M))
    _run(fast, lists, shapes, outputs, hyper, True, device, scalars)
    for out, stat in zip(outputs, (P, G, M)):
        for j in fast:
            if out[j] is not stat[j]:
                stat[j].copy_(out[j])


def _bias_terms(step: float, lr: float, beta1: float, beta2: float) -> list[float]:
    """``[lr / (1 − β₁ᵗ), √(1 − β₂ᵗ)]`` for step ``t``."""
    return [lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step)]


def _register_cuda_impls() -> None:
    """Make ``torch.ops.asft.*`` dispatch CUDA tensors to these kernels."""
    for name, fn in (("stats_pass", stats_pass), ("fused_anchored_adamw_", fused_step)):
        try:
            _lib.impl(name, fn, "CUDA")
        except RuntimeError:
            pass  # already registered (module reloaded)


_register_cuda_impls()
