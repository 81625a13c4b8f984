"""The Triton kernels of the backend; their docstrings hold the math.

Math (docs/method.md, per pair ``j``; ``Q_B = 2λ M``, ``R_B = 2λ diag(w) P M``,
``H = 2λ (G − Pᵀ diag(w) P)``, computed by :func:`_terms_kernel` in a prepared step or
handed in precomputed to ``fused_step``)::

    rows of B (m, r):       g = grad_B + B Q_B − U R_B          U: (m, k)
    column blocks of A:     g = grad_A + H A                    A: (r, n)
    both:                   AdamW exactly as torch.optim.AdamW (decoupled weight decay)
    next statistics:        P' = Uᵀ B',  G' = B'ᵀ B',  M' = A' A'ᵀ   (from the stored B', A')

* :func:`_factor_kernel`, specialised by the constexpr ``FACTOR_A``: a program owns a
  *strip* of consecutive blocks (``BLOCK_ROWS`` rows of one B, or ``BLOCK_COLS`` columns of
  one A); with ``UPDATE`` it applies the anchoring gradient and AdamW, and it accumulates
  the strip's partial statistics in registers (P and G for B, M for A) and writes them once
  to a scratch buffer; with ``UPDATE=False`` it only computes the statistics (the stats
  pass);
* :func:`_terms_kernel` (prepared steps): one program per pair advances the pair's two step
  counters on the device, computes the AdamW scalars of both factors from them (bias
  corrections in fp64, as torch's capturable fused AdamW does), the anchoring terms and the
  pair's share of ``R``; nothing is read back to the host;
* :func:`_p_tile_kernel` (large ``k``): ``P' = Uᵀ B'`` by programs that each own a tile
  (pair, block of ``k`` rows of P') and loop over the rows of U in a fixed order: no
  partials, no reduction, deterministic;
* :func:`_reduce_kernel` sums the partials of every pair in a fixed order (strip 0, 1,
  …), so results are bitwise reproducible on a given GPU: no atomics anywhere;
* each program reads its pair's tensor addresses from an int64 table (fields below) and
  casts them with ``.to(tl.pointer_type(...))``, so all pairs of a bucket share a launch.

The kernels are plain functions wrapped by ``triton.jit`` on first launch (:func:`jitted`):
Triton decides at decoration time whether a function is compiled or interpreted, and tests
switch the interpreter on after this module is imported. For the same reason the one device
function they call, :func:`_u_dot` (the products with U), is bound by :func:`jitted` to its
wrapper of the kernel's mode: a compiled kernel cannot call an interpreted function, nor the
interpreter a compiled one. Otherwise they call only built-in ``tl`` functions.
"""

from __future__ import annotations

import functools
import types

import triton
import triton.language as tl

# fp32 tl.dot precision of the r×r products: "ieee" keeps results within ~1e-6 of the
# reference (tf32 would not). The U products (U R_B, Uᵀ B') take their own precision, chosen
# per call (launch.U_PRECISIONS).
DOT_PRECISION = "ieee"

# Fields of one row of the pair table (int64): addresses, then sizes. Kernel-visible
# globals must be ``tl.constexpr``; they index host lists as ints too.
_C = tl.constexpr
_B, _GRAD_B, _EXP_AVG_B, _EXP_AVG_SQ_B, _U, _Q_B, _R_B = (_C(i) for i in range(7))
_A, _GRAD_A, _EXP_AVG_A, _EXP_AVG_SQ_A, _H = (_C(i) for i in range(7, 12))
_M_ROWS, _N_COLS, _RANK, _K = (_C(i) for i in range(12, 16))
# statistics P (k, r), G, M (r, r) (fp32, written by the step), anchor weights w (k,),
# and the pair's index in the whole batch (counters, scale, R)
_P, _G, _M, _W, _INDEX = (_C(i) for i in range(16, 21))
PAIR_FIELDS = _C(21)
# Fields of one row of the per-pair float table (fp32): the AdamW scalars of one factor,
# from _FACTOR_B (B) and _FACTOR_A (A) on, then the gradient scale and the write switch.
_STEP_SIZE, _BC2_SQRT, _DECAY, _BETA1, _OM_BETA1, _BETA2, _OM_BETA2, _EPS, _SIGN = (_C(i) for i in range(9))
_FACTOR_B, _FACTOR_A = _C(0), _C(9)
_GRAD_SCALE, _KEEP = _C(18), _C(19)
SCALAR_FIELDS = _C(20)
# Fields of one row of the hyperparameter table (fp64, one row per factor: A then B).
_LR, _HB1, _HB2, _HEPS, _HWD, _HSIGN = (_C(i) for i in range(6))
HYPER_FIELDS = _C(6)
# Fields of one row of a P' tile table (int64): pair index, first row of P'.
PTILE_FIELDS = _C(2)
# Fields of one row of a tile table (int64): pair index, first row/column, number of
# blocks, scratch offset.
TILE_FIELDS = _C(4)
# Fields of one row of the reduction table (int64).
REDUCE_FIELDS = _C(5)
REDUCE_BLOCK = 256


def _interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run in the interpreter on CPU tensors."""
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def _u_dot(u, x, acc, U_DTYPE: tl.constexpr, U_PRECISION: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """``acc + u x``: a product with U, as every kernel computes it (``U R_B`` and ``Uᵀ B'``).

    ``u`` (p, q) is a block of U or of Uᵀ in ``U_DTYPE``, ``x`` (q, s) and ``acc`` (p, s) are
    fp32. ``U_PRECISION`` is the ``tl.dot`` precision of the product. With a bf16 U and a
    precision other than ``"ieee"``, ``x`` is split into three bf16 parts, ``x = hi + mid +
    lo`` (exact to fp32 accuracy; U is exact in bf16), and the three products run on bf16
    tensor cores (``NATIVE_BF16``); without ``NATIVE_BF16`` (the interpreter, whose dot
    multiplies bf16 storage bits) the same exact products run in fp32.
    """
    if (U_DTYPE == tl.bfloat16) and (U_PRECISION != "ieee"):
        hi = x.to(tl.bfloat16)
        rest = x - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        if NATIVE_BF16:
            acc = tl.dot(u, hi, acc)
            acc = tl.dot(u, mid, acc)
            acc = tl.dot(u, lo, acc)
        else:
            uf = u.to(tl.float32)
            acc = tl.dot(uf, hi.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(uf, mid.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(uf, lo.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(u.to(tl.float32), x, acc, input_precision=U_PRECISION)
    return acc


def _factor_kernel(
    pairs,  # int64 (n_pairs, PAIR_FIELDS): addresses and sizes
    scalars,  # fp32 (n_pairs, SCALAR_FIELDS): AdamW scalars of both factors, gradient scale, write switch
    tiles,  # int64 (n_programs, TILE_FIELDS): pair, first row/column, blocks, scratch offset
    scratch,  # fp32: partial statistics, one block per program
    PARAM_DTYPE: tl.constexpr,
    U_DTYPE: tl.constexpr,
    FACTOR_A: tl.constexpr,
    UPDATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    U_PRECISION: tl.constexpr,
    P_SPLIT: tl.constexpr,
    GRAD_SCALE: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
):
    """One strip of one pair: anchoring gradient + AdamW (``UPDATE``) and partial statistics.

    A program walks ``n_blocks`` consecutive blocks of its pair (a *strip*).

    * A (r, n), blocks of ``BLOCK_COLS`` columns: ``g = grad_A + H A``, AdamW, and
      ``M_s = A' A'ᵀ`` (r, r) of the strip, accumulated in registers.
    * B (m, r), blocks of ``BLOCK_ROWS`` rows. Phase 1, per block: ``g = grad_B + B Q_B −
      U R_B`` (U swept in chunks of ``BLOCK_K`` columns), AdamW, store, and ``G_s += B'ᵀ B'``.
      Phase 2 (``P_SPLIT``), per chunk of ``BLOCK_K`` columns of U: ``P_s[chunk] =
      Σ_blocks U[rows, chunk]ᵀ B'[rows]``, reading back the B' just stored. The strip's U was
      read in phase 1 and is sized to stay in cache, so U comes from DRAM once. Without
      ``P_SPLIT``, :func:`_p_tile_kernel` computes P' afterwards.

    The AdamW scalars of each factor come from the pair's row of ``scalars``: ``lr/(1−β₁ᵗ)``,
    ``√(1−β₂ᵗ)``, ``1 − lr·wd``, ``β₁``, ``1−β₁``, ``β₂``, ``1−β₂``, ``ε``, the sign (−1 for
    maximize); then the gradient scale (gradients are divided by it when ``GRAD_SCALE``) and
    the write switch (0: nothing is stored, as a fused AdamW step skipped on ``found_inf``).
    The gradient scale is stored as its reciprocal and multiplied: exactly the division for
    the powers of 2 a ``GradScaler`` uses, within one rounding for other scales.
    ``U_PRECISION`` is the ``tl.dot`` precision of the products with U (:func:`_u_dot`); with a
    bf16 U and a precision other than ``"ieee"``, the fp32 operand is split into three bf16
    parts so that the products run on bf16 tensor cores at fp32 accuracy (``NATIVE_BF16``; off
    under the interpreter, whose dot multiplies bf16 storage bits: the same exact products in
    fp32).

    Partials go to the program's scratch block: ``P_s`` (k, r, with ``P_SPLIT``) then ``G_s``
    (r, r) for B, ``M_s`` (r, r) for A. All math in fp32; the statistics use the values as
    stored (rounded to the parameter dtype).
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
    srow = scalars + pair * SCALAR_FIELDS
    keep = tl.load(srow + _KEEP)  # write switch (a float: a 0-d bool does not combine with masks everywhere)
    if FACTOR_A:
        param_ptr = tl.load(row + _A).to(tl.pointer_type(PARAM_DTYPE))
        grad_ptr = tl.load(row + _GRAD_A).to(tl.pointer_type(PARAM_DTYPE))
        exp_avg_ptr = tl.load(row + _EXP_AVG_A).to(tl.pointer_type(tl.float32))
        exp_avg_sq_ptr = tl.load(row + _EXP_AVG_SQ_A).to(tl.pointer_type(tl.float32))
        mix_ptr = tl.load(row + _H).to(tl.pointer_type(tl.float32))
        frow = srow + _FACTOR_A
    else:
        param_ptr = tl.load(row + _B).to(tl.pointer_type(PARAM_DTYPE))
        grad_ptr = tl.load(row + _GRAD_B).to(tl.pointer_type(PARAM_DTYPE))
        exp_avg_ptr = tl.load(row + _EXP_AVG_B).to(tl.pointer_type(tl.float32))
        exp_avg_sq_ptr = tl.load(row + _EXP_AVG_SQ_B).to(tl.pointer_type(tl.float32))
        mix_ptr = tl.load(row + _Q_B).to(tl.pointer_type(tl.float32))
        u_base = tl.load(row + _U).to(tl.pointer_type(U_DTYPE))
        rb_ptr = tl.load(row + _R_B).to(tl.pointer_type(tl.float32))
        frow = srow + _FACTOR_B
    if UPDATE:
        mix = tl.load(mix_ptr + rr_idx, mask=rr_mask, other=0.0)  # H (A) or Q_B (B)
        step_size = tl.load(frow + _STEP_SIZE)
        bc2_sqrt = tl.load(frow + _BC2_SQRT)
        decay = tl.load(frow + _DECAY)
        beta2 = tl.load(frow + _BETA2)
        one_minus_beta1 = tl.load(frow + _OM_BETA1)
        one_minus_beta2 = tl.load(frow + _OM_BETA2)
        eps = tl.load(frow + _EPS)
        grad_sign = tl.load(frow + _SIGN)
        inv_grad_scale = tl.load(srow + _GRAD_SCALE)
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
            if GRAD_SCALE:  # times 1/scale: exact for a GradScaler's scales (powers of 2)
                g = g * inv_grad_scale
            if FACTOR_A:
                g = g + tl.dot(mix, x, input_precision=DOT_PRECISION)
            else:
                g = g + tl.dot(x, mix, input_precision=DOT_PRECISION)
                u_rb = tl.full((BLOCK_ROWS, BLOCK_R), 0.0, tl.float32)
                for k0 in range(0, k, BLOCK_K):
                    ck = k0 + offs_k
                    u = tl.load(u_base + offs_m[:, None] * k + ck[None, :],
                                mask=mask_m[:, None] & (ck < k)[None, :], other=0.0)
                    rb = tl.load(rb_ptr + ck[:, None] * r + offs_r[None, :],
                                 mask=(ck < k)[:, None] & mask_r[None, :], other=0.0)
                    u_rb = _u_dot(u, rb, u_rb, U_DTYPE, U_PRECISION, NATIVE_BF16)
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
            written = tl.where(mask, keep, 0.0) != 0.0
            tl.store(exp_avg_ptr + idx, exp_avg, mask=written)
            tl.store(exp_avg_sq_ptr + idx, exp_avg_sq, mask=written)
            if PARAM_DTYPE == tl.bfloat16:
                # Round to nearest even explicitly: the interpreter's fp32 -> bf16 cast truncates.
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)
            stored = x.to(PARAM_DTYPE)
            tl.store(param_ptr + idx, stored, mask=written)
            # The statistics describe the parameters as stored, after rounding.
            x = tl.where(mask, stored.to(tl.float32), 0.0)

        if FACTOR_A:
            acc_stat = tl.dot(x, tl.trans(x), acc_stat, input_precision=DOT_PRECISION)
        else:
            acc_stat = tl.dot(tl.trans(x), x, acc_stat, input_precision=DOT_PRECISION)

    if FACTOR_A:
        tl.store(scratch + out + rr_idx, acc_stat, mask=rr_mask)
    elif P_SPLIT:
        tl.store(scratch + out + k * r + rr_idx, acc_stat, mask=rr_mask)
        # Phase 2 reads back rows of B' stored by other threads of this program (skipped
        # step: the rows as they are, the partials are not used).
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
                            mask=mask_m[:, None] & (ck < k)[None, :], other=0.0)
                acc_p = _u_dot(tl.trans(u), x, acc_p, U_DTYPE, U_PRECISION, NATIVE_BF16)
            tl.store(scratch + out + ck[:, None] * r + offs_r[None, :], acc_p,
                     mask=(ck < k)[:, None] & mask_r[None, :])
    else:
        tl.store(scratch + out + rr_idx, acc_stat, mask=rr_mask)


def _p_tile_kernel(
    pairs,  # int64 (n_pairs, PAIR_FIELDS): addresses and sizes
    scalars,  # fp32 (n_pairs, SCALAR_FIELDS): the write switch
    ptiles,  # int64 (n_programs, PTILE_FIELDS): pair, first row of P'
    PARAM_DTYPE: tl.constexpr,
    U_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    U_PRECISION: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
):
    """``P'[k0 : k0 + BLOCK_KP] = U[:, k0 : k0 + BLOCK_KP]ᵀ B'`` for one tile of one pair.

    The program sweeps the m rows of U and B' in chunks of ``BLOCK_M``, in order, and
    accumulates the (BLOCK_KP, r) tile in registers: every element of P' is summed by one
    program in a fixed order (deterministic, no partials, no reduction). ``B'`` is read as
    stored (after the update, in the parameter dtype). Precision as :func:`_factor_kernel`'s
    ``U_PRECISION``. Nothing is stored when the pair's write switch is 0.
    """
    program = tl.program_id(0)
    pair = tl.load(ptiles + program * PTILE_FIELDS)
    k0 = tl.load(ptiles + program * PTILE_FIELDS + 1)
    row = pairs + pair * PAIR_FIELDS
    r = tl.load(row + _RANK)
    m = tl.load(row + _M_ROWS)
    k = tl.load(row + _K)
    keep = tl.load(scalars + pair * SCALAR_FIELDS + _KEEP)
    b_ptr = tl.load(row + _B).to(tl.pointer_type(PARAM_DTYPE))
    u_base = tl.load(row + _U).to(tl.pointer_type(U_DTYPE))
    p_ptr = tl.load(row + _P).to(tl.pointer_type(tl.float32))
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    ck = k0 + tl.arange(0, BLOCK_KP)
    mask_k = ck < k
    acc = tl.full((BLOCK_KP, BLOCK_R), 0.0, tl.float32)
    for m0 in range(0, m, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m
        u = tl.load(u_base + offs_m[:, None] * k + ck[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        x = tl.load(b_ptr + offs_m[:, None] * r + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                    other=0.0).to(tl.float32)
        acc = _u_dot(tl.trans(u), x, acc, U_DTYPE, U_PRECISION, NATIVE_BF16)
    tl.store(p_ptr + ck[:, None] * r + offs_r[None, :], acc,
             mask=tl.where(mask_k[:, None] & mask_r[None, :], keep, 0.0) != 0.0)


def _terms_kernel(
    pairs,  # int64 (n_pairs, PAIR_FIELDS): addresses and sizes
    counters,  # fp32/fp64 (2L,): the step counters of the whole batch, A's then B's
    hyper,  # fp64 (2, HYPER_FIELDS): AdamW hyperparameters of A (row 0) and B (row 1)
    scale,  # fp32 (L,): 2λ·coef per pair of the whole batch
    grad_scale,  # fp32 0-d: gradients are divided by it (1 when the step has no gradient scale)
    found_inf,  # fp32 0-d: nothing is written when it is not 0 (0 when the step has none)
    scalars,  # fp32 (n_pairs, SCALAR_FIELDS): written, for the factor kernels
    rparts,  # fp32 (L,): ½⟨H, M⟩ per pair of the whole batch
    n_total,  # L: pairs in the whole batch
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The per-pair prologue of a prepared step, one program per pair ``j`` (index ``i`` in
    the whole batch), all on the device::

        t_A = counters[i] + 1,  t_B = counters[L + i] + 1       (stored unless skipped)
        per factor, in fp64: lr/(1 − β₁ᵗ), √(1 − β₂ᵗ), 1 − lr·wd   → scalars[j] (fp32)
        Pw = diag(w) P,  H = s (G − Pᵀ Pw),  Q_B = s M,  R_B = Pw Q_B      (s = scale[i])
        rparts[i] = ½ ⟨H, M⟩

    ``scalars[j]`` also receives ``1 / grad_scale`` and the write switch (0 when
    ``found_inf != 0``: the counters are then left as they are, and the factor kernels store
    nothing). ``Q_B``, ``R_B``, ``H`` are the step's work
    buffers and are always written; ``R`` is the value at the statistics before the step.
    """
    pair = tl.program_id(0)
    row = pairs + pair * PAIR_FIELDS
    i = tl.load(row + _INDEX)
    r = tl.load(row + _RANK)
    k = tl.load(row + _K)
    keep = tl.where(tl.load(found_inf) != 0.0, 0.0, 1.0)
    srow = scalars + pair * SCALAR_FIELDS
    for f in tl.static_range(2):  # f = 0: A, f = 1: B
        c_ptr = counters + i + f * n_total
        t = tl.load(c_ptr).to(tl.float64) + 1.0
        tl.store(c_ptr, t.to(counters.dtype.element_ty), mask=keep != 0.0)
        h = hyper + f * HYPER_FIELDS
        lr = tl.load(h + _LR)
        beta1 = tl.load(h + _HB1)
        beta2 = tl.load(h + _HB2)
        wd = tl.load(h + _HWD)
        # β^t = exp(t·log β); β = 0 gives exp(−inf) = 0 as in torch
        bc1 = 1.0 - tl.exp(t * tl.log(beta1))
        bc2 = 1.0 - tl.exp(t * tl.log(beta2))
        dst = srow + _FACTOR_A * (1 - f) + _FACTOR_B * f
        tl.store(dst + _STEP_SIZE, (lr / bc1).to(tl.float32))
        tl.store(dst + _BC2_SQRT, tl.sqrt(bc2).to(tl.float32))  # fp64 sqrt: correctly rounded
        tl.store(dst + _DECAY, (1.0 - lr * wd).to(tl.float32))
        tl.store(dst + _BETA1, beta1.to(tl.float32))
        tl.store(dst + _OM_BETA1, (1.0 - beta1).to(tl.float32))
        tl.store(dst + _BETA2, beta2.to(tl.float32))
        tl.store(dst + _OM_BETA2, (1.0 - beta2).to(tl.float32))
        tl.store(dst + _EPS, tl.load(h + _HEPS).to(tl.float32))
        tl.store(dst + _SIGN, tl.load(h + _HSIGN).to(tl.float32))
    tl.store(srow + _GRAD_SCALE, tl.div_rn(1.0, tl.load(grad_scale).to(tl.float32)))
    tl.store(srow + _KEEP, keep)

    s = tl.load(scale + i).to(tl.float32)
    p_ptr = tl.load(row + _P).to(tl.pointer_type(tl.float32))
    w_ptr = tl.load(row + _W).to(tl.pointer_type(tl.float32))
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    rr_idx = offs_r[:, None] * r + offs_r[None, :]
    rr_mask = mask_r[:, None] & mask_r[None, :]
    offs_k = tl.arange(0, BLOCK_K)
    ptw = tl.full((BLOCK_R, BLOCK_R), 0.0, tl.float32)  # Pᵀ diag(w) P
    for k0 in range(0, k, BLOCK_K):
        ck = k0 + offs_k
        pmask = (ck < k)[:, None] & mask_r[None, :]
        p = tl.load(p_ptr + ck[:, None] * r + offs_r[None, :], mask=pmask, other=0.0)
        wv = tl.load(w_ptr + ck, mask=ck < k, other=0.0)
        ptw = tl.dot(tl.trans(p), p * wv[:, None], ptw, input_precision="ieee")
    g = tl.load(tl.load(row + _G).to(tl.pointer_type(tl.float32)) + rr_idx, mask=rr_mask, other=0.0)
    mm = tl.load(tl.load(row + _M).to(tl.pointer_type(tl.float32)) + rr_idx, mask=rr_mask, other=0.0)
    h_val = (g - ptw) * s
    q_val = mm * s
    tl.store(tl.load(row + _H).to(tl.pointer_type(tl.float32)) + rr_idx, h_val, mask=rr_mask)
    tl.store(tl.load(row + _Q_B).to(tl.pointer_type(tl.float32)) + rr_idx, q_val, mask=rr_mask)
    # ½⟨H, M⟩ as ones·(H∘M)·ones by two products (tl.sum is a jitted helper, which the
    # interpreter switched on at run time cannot call); every element of the (16, 16)
    # result holds the sum, the first is stored.
    ones_l = tl.full((16, BLOCK_R), 1.0, tl.float32)
    ones_r = tl.full((BLOCK_R, 16), 1.0, tl.float32)
    col = tl.dot(ones_l, h_val * mm, input_precision="ieee")
    total = tl.dot(col, ones_r, input_precision="ieee") * 0.5
    o16 = tl.arange(0, 16)
    first = (o16[:, None] == 0) & (o16[None, :] == 0)
    tl.store(rparts + i + o16[:, None] * 0 + o16[None, :] * 0, total, mask=first)
    rb_ptr = tl.load(row + _R_B).to(tl.pointer_type(tl.float32))
    for k0 in range(0, k, BLOCK_K):
        ck = k0 + offs_k
        pmask = (ck < k)[:, None] & mask_r[None, :]
        p = tl.load(p_ptr + ck[:, None] * r + offs_r[None, :], mask=pmask, other=0.0)
        wv = tl.load(w_ptr + ck, mask=ck < k, other=0.0)
        rb = tl.dot(p * wv[:, None], q_val, input_precision="ieee")
        tl.store(rb_ptr + ck[:, None] * r + offs_r[None, :], rb, mask=pmask)


def _reduce_kernel(
    jobs,  # int64 (n_jobs, REDUCE_FIELDS): destination address, source offset, tile stride, numel, n_tiles
    scratch,  # fp32 partial statistics
    scalars,  # fp32: row 0 of a scalar table, whose write switch applies to every job
    BLOCK: tl.constexpr,
):
    """``dest[e] = Σ_t scratch[src + t·stride + e]`` for ``t = 0, 1, …`` in that order
    (deterministic: no atomics, a fixed summation order); nothing is stored when the write
    switch ``scalars[_KEEP]`` is 0."""
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
    keep = tl.load(scalars + _KEEP)
    tl.store(dest + offs, acc, mask=tl.where(mask, keep, 0.0) != 0.0)


_JIT_CACHE: dict[tuple[str, bool], object] = {}
# The device functions the kernels call, by name: decorated at import (for the mode of that
# moment), rebound by jitted() to the wrapper of the kernel's mode.
_DEVICE_FUNCTIONS = ("_u_dot",)


def jitted(fn):
    """``triton.jit(fn)`` for the current mode (compiled, or interpreted when
    ``TRITON_INTERPRET=1``), created once per mode. A kernel's wrapper sees the device
    functions (:data:`_DEVICE_FUNCTIONS`) wrapped for the same mode: it is made from a copy of
    ``fn`` whose globals name those wrappers."""
    key = (fn.__name__, _interpreting())
    if key not in _JIT_CACHE:
        if fn.__name__ in _DEVICE_FUNCTIONS:
            _JIT_CACHE[key] = triton.jit(fn)
        else:
            scope = dict(fn.__globals__)
            for name in _DEVICE_FUNCTIONS:
                scope[name] = jitted(globals()[name].fn)
            bound = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
            _JIT_CACHE[key] = triton.jit(functools.update_wrapper(bound, fn))
    return _JIT_CACHE[key]
