"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` needs only the
``ptxas`` that ships with Triton. The cubin is then inspected with the ``cuobjdump
-res-usage`` shipped next to it: ``STACK`` or ``LOCAL`` above zero means registers spill
to local memory, which the default configuration must not do.

``python tests/test_triton_aot.py`` prints the full registers/spills table of
docs/triton.md (every dtype and rank bucket; slower than the test) for the Triton it runs
with; ``--stages`` adds the table of every ``num_stages`` choice (1, 2, 3) per variant, the
measurement behind the choices of ``kernel_config``. ``num_stages`` is a launch option, as
the backend passes it.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
T = pytest.importorskip("asft_kernels.ops.triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS = os.path.join(NVIDIA_BIN, "ptxas")
CUOBJDUMP = os.path.join(NVIDIA_BIN, "cuobjdump")
ARCHS = [80, 90]

pytestmark = pytest.mark.skipif(not os.path.exists(PTXAS), reason="Triton's bundled ptxas is not present")

REDUCE_OPTIONS = {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": True}
_POINTERS = {"pairs": "*i64", "scalars": "*fp32", "tiles": "*i64", "scratch": "*fp32", "jobs": "*i64",
             "ptiles": "*i64", "counters": "*fp32", "hyper": "*fp64", "scale": "*fp32", "grad_scale": "*fp32",
             "found_inf": "*fp32", "rparts": "*fp32", "n_total": "i32"}
#: The tensor-core precisions of the U products the installed Triton offers.
TC_PRECISIONS = [p for p in ("tf32x3", "tf32", "bf16x3", "bf16x6") if p in T.u_precisions()]


def _signature(fn, constexprs: dict) -> dict:
    sig = {}
    for name in inspect.signature(fn).parameters:
        sig[name] = "constexpr" if name in constexprs else _POINTERS.get(name, "fp32")
    return sig


def compile_kernel(fn, constexprs: dict, options: dict, arch: int):
    """Compile the plain kernel function ``fn`` for ``sm_<arch>`` with launch ``options``
    (``num_warps``, ``num_stages``, ``maxnreg``, ``enable_fp_fusion``); returns the
    CompiledKernel."""
    jit_fn = triton.jit(fn)
    src = ASTSource(jit_fn, _signature(fn, constexprs), constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of the kernel in ``cubin`` (cuobjdump -res-usage)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    assert set(fields) >= {"REG", "STACK", "SHARED", "LOCAL"}, out
    return {k: int(v) for k, v in fields.items()}


def factor_variant(block_r: int, factor_a: bool, update: bool, param_dtype, u_dtype=None, precision="ieee",
                   split=True, grad_scale=False):
    """Constexprs and launch options of :func:`_factor_kernel` at its default configuration,
    split as the backend's launch splits them."""
    cfg = T.kernel_config(block_r, factor_a, update)
    options = {key: cfg.pop(key) for key in T.LAUNCH_OPTIONS if key in cfg}
    assert "num_stages" in options
    const = dict(PARAM_DTYPE=param_dtype, U_DTYPE=u_dtype or tl.float32, FACTOR_A=factor_a, UPDATE=update,
                 BLOCK_R=block_r, DOT_PRECISION=T.DOT_PRECISION, U_PRECISION=precision, P_SPLIT=split,
                 GRAD_SCALE=grad_scale, NATIVE_BF16=True, **cfg)
    return const, options


def ptile_variant(block_r: int, param_dtype, u_dtype, precision: str):
    """Constexprs and launch options of :func:`_p_tile_kernel` as the backend launches it."""
    cfg = T.ptile_config(block_r, precision)
    options = {key: cfg.pop(key) for key in T.LAUNCH_OPTIONS if key in cfg}
    const = dict(PARAM_DTYPE=param_dtype, U_DTYPE=u_dtype, BLOCK_R=block_r, U_PRECISION=precision,
                 NATIVE_BF16=True, **cfg)
    return const, options


def terms_variant(block_r: int):
    cfg = T.terms_config(block_r)
    options = {key: cfg.pop(key) for key in T.LAUNCH_OPTIONS if key in cfg}
    return dict(BLOCK_R=block_r, **cfg), options


def sass(cubin: bytes) -> str:
    """The SASS of ``cubin`` (cuobjdump -sass)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True, check=True).stdout


# The kernels as the backend launches them; the last ones are the tightest fp32/stats cases.
CASES = [
    pytest.param(block_r, factor_a, True, "bf16", id=f"{'A' if factor_a else 'B'}-r{block_r}-bf16-update")
    for block_r in (16, 64) for factor_a in (False, True)
] + [
    pytest.param(64, True, True, "fp16", id="A-r64-fp16-update"),
    pytest.param(64, False, True, "fp32", id="B-r64-fp32-update"),
    pytest.param(64, False, False, "fp16", id="B-r64-fp16-stats"),
    pytest.param(64, True, False, "fp16", id="A-r64-fp16-stats"),
]
_TL = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize(("block_r", "factor_a", "update", "dtype"), CASES)
def test_factor_kernel_compiles_without_spills(arch, block_r, factor_a, update, dtype):
    const, options = factor_variant(block_r, factor_a, update, getattr(tl, _TL[dtype]))
    kernel = compile_kernel(T._factor_kernel, const, options, arch)
    assert kernel.asm["cubin"][:4] == b"\x7fELF"
    assert f".target sm_{arch}" in kernel.asm["ptx"]
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("Triton's bundled cuobjdump is not present: compiled, spills not checked")
    usage = resource_usage(kernel.asm["cubin"])
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, usage
    assert usage["REG"] <= 255


def _no_spills(kernel) -> dict:
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("Triton's bundled cuobjdump is not present: compiled, spills not checked")
    usage = resource_usage(kernel.asm["cubin"])
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, usage
    assert usage["REG"] <= 255
    return usage


# B update variants of the large-anchor path: P' by tiles (no phase 2), U products on the
# tensor cores, a gradient scale.
LARGE_CASES = [
    pytest.param(block_r, udt, precision, id=f"B-r{block_r}-U{udt}-{precision}")
    for block_r in (16, 64) for udt in ("fp32", "bf16") for precision in ["ieee", *TC_PRECISIONS[:1]]
]


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize(("block_r", "udt", "precision"), LARGE_CASES)
def test_tiled_b_update_and_p_tiles_compile_without_spills(arch, block_r, udt, precision):
    const, options = factor_variant(block_r, False, True, tl.float32, getattr(tl, _TL[udt]), precision, split=False,
                                    grad_scale=True)
    _no_spills(compile_kernel(T._factor_kernel, const, options, arch))
    const, options = ptile_variant(block_r, tl.float32, getattr(tl, _TL[udt]), precision)
    _no_spills(compile_kernel(T._p_tile_kernel, const, options, arch))


# Split-m variants (U products at "ieee") with a bf16 U and a gradient scale (the r = 16 B
# update with fp32 params and bf16 U spilled 8 bytes on sm_90 at 4 warps).
SPLIT_CASES = [
    pytest.param(16, "fp32", "bf16", "ieee", False, id="B-r16-fp32-Ubf16"),
    pytest.param(16, "bf16", "fp32", "ieee", True, id="B-r16-bf16-gs"),
    pytest.param(64, "fp32", "bf16", "ieee", True, id="B-r64-fp32-Ubf16-gs"),
]


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize(("block_r", "pdt", "udt", "precision", "grad_scale"), SPLIT_CASES)
def test_split_b_update_variants_compile_without_spills(arch, block_r, pdt, udt, precision, grad_scale):
    """B updates with split-m P' (and the A update, and the stats pass of the same params)
    beyond the default table's variants: fp32 params with bf16 U, a gradient scale."""
    const, options = factor_variant(block_r, False, True, getattr(tl, _TL[pdt]), getattr(tl, _TL[udt]), precision,
                                    split=True, grad_scale=grad_scale)
    _no_spills(compile_kernel(T._factor_kernel, const, options, arch))
    const, options = factor_variant(block_r, False, False, getattr(tl, _TL[pdt]), getattr(tl, _TL[udt]), precision,
                                    split=True)
    _no_spills(compile_kernel(T._factor_kernel, const, options, arch))
    const, options = factor_variant(block_r, True, True, getattr(tl, _TL[pdt]), grad_scale=True)
    _no_spills(compile_kernel(T._factor_kernel, const, options, arch))


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize("block_r", [16, 64])
def test_terms_kernel_compiles_without_spills(arch, block_r):
    const, options = terms_variant(block_r)
    _no_spills(compile_kernel(T._terms_kernel, const, options, arch))


@pytest.mark.skipif(not TC_PRECISIONS, reason="this Triton offers no tensor-core fp32 precision")
@pytest.mark.parametrize(("block_r", "udt"), [(16, "fp32"), (64, "fp32"), (64, "bf16")])
def test_u_products_use_tensor_cores_on_sm90(block_r, udt):
    """At a tensor-core precision the sm_90 SASS of the U-product kernels (the P' tiles, the
    B update's U R_B) holds tensor-core instructions (HMMA or HGMMA); at ``"ieee"`` the P'
    tiles hold none (FMA units)."""
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("Triton's bundled cuobjdump is not present")
    precision = TC_PRECISIONS[0]
    u_dtype = getattr(tl, _TL[udt])
    tensor_core = re.compile(r"\bH(G)?MMA\b")
    const, options = ptile_variant(block_r, tl.float32, u_dtype, precision)
    assert tensor_core.search(sass(compile_kernel(T._p_tile_kernel, const, options, 90).asm["cubin"]))
    const, options = factor_variant(block_r, False, True, tl.float32, u_dtype, precision, split=False)
    assert tensor_core.search(sass(compile_kernel(T._factor_kernel, const, options, 90).asm["cubin"]))
    const, options = ptile_variant(block_r, tl.float32, tl.float32, "ieee")
    assert not tensor_core.search(sass(compile_kernel(T._p_tile_kernel, const, options, 90).asm["cubin"]))


def test_launched_wrapper_binds_the_compiled_device_function(monkeypatch):
    """The wrapper the backend launches on a GPU (``jitted`` with the interpreter off) is made
    from a copy of the kernel whose globals name the compiled ``_u_dot``; it compiles (bf16 U
    at a tensor-core precision: the three-part split) to the registers of the plain kernel."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = T.jitted(T._factor_kernel)
    assert type(kernel).__name__ == "JITFunction"
    assert type(kernel.fn.__globals__["_u_dot"]).__name__ == "JITFunction"
    const, options = factor_variant(16, False, True, tl.float32, tl.bfloat16, (TC_PRECISIONS or ["ieee"])[0],
                                    split=False)
    src = ASTSource(kernel, _signature(T._factor_kernel, const), const)
    launched = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    plain = compile_kernel(T._factor_kernel, const, options, 90)
    assert launched.asm["ttgir"].count("tt.dot") == plain.asm["ttgir"].count("tt.dot") > 0
    if os.path.exists(CUOBJDUMP):
        assert resource_usage(launched.asm["cubin"]) == resource_usage(plain.asm["cubin"])
    # switched on at run time, the interpreter gets a wrapper that calls the interpreted _u_dot
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = T.jitted(T._factor_kernel)
    assert type(interpreted).__name__ == "InterpretedFunction"
    assert type(interpreted.fn.__globals__["_u_dot"]).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def test_reduce_kernel_compiles_without_spills(arch):
    kernel = compile_kernel(T._reduce_kernel, {"BLOCK": T.REDUCE_BLOCK}, REDUCE_OPTIONS, arch)
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("Triton's bundled cuobjdump is not present: compiled, spills not checked")
    usage = resource_usage(kernel.asm["cubin"])
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, usage


def _usage_cells(const: dict, options: dict) -> list[str]:
    cells = []
    for arch in ARCHS:
        u = resource_usage(compile_kernel(T._factor_kernel, const, options, arch).asm["cubin"])
        cells.append(f"{u['REG']}/{u['STACK']}/{u['LOCAL']}")
    return cells


def _variants() -> list[tuple]:
    """``(update, factor_a, block_r, param dtype, U dtype)`` of every kernel variant."""
    variants = []
    for factor_a in (False, True):
        for block_r in (16, 64):
            for pdt in ("fp32", "bf16", "fp16"):
                variants.append((True, factor_a, block_r, pdt, "fp32"))
            if not factor_a:
                variants.append((True, factor_a, block_r, "fp32", "bf16"))
            variants.append((False, factor_a, block_r, "bf16", "fp32"))
    return variants


def _name(update: bool, factor_a: bool) -> str:
    return ("A cols" if factor_a else "B rows") + (" update" if update else " stats")


def _table() -> str:
    """Markdown table: every factor-kernel variant at its default configuration, both archs."""
    rows = ["| kernel | padded r | params | U | num_warps | num_stages | block | sm_80 REG/STACK/LOCAL | "
            "sm_90 REG/STACK/LOCAL |", "|---|---|---|---|---|---|---|---|---|"]
    for update, factor_a, block_r, pdt, udt in _variants():
        const, options = factor_variant(block_r, factor_a, update, getattr(tl, _TL[pdt]), getattr(tl, _TL[udt]))
        cells = _usage_cells(const, options)
        tile = (f"{block_r}x{const['BLOCK_COLS']}" if factor_a
                else f"{const['BLOCK_ROWS']}x{block_r}, U chunk {const['BLOCK_ROWS']}x{const['BLOCK_K']}")
        rows.append(f"| {_name(update, factor_a)} | {block_r} | {pdt} | {udt if not factor_a else '-'} | "
                    f"{options['num_warps']} | {options['num_stages']} | {tile} | {cells[0]} | {cells[1]} |")
        print(rows[-1], file=sys.stderr, flush=True)
    cells = []
    for arch in ARCHS:
        kernel = compile_kernel(T._reduce_kernel, {"BLOCK": T.REDUCE_BLOCK}, REDUCE_OPTIONS, arch)
        u = resource_usage(kernel.asm["cubin"])
        cells.append(f"{u['REG']}/{u['STACK']}/{u['LOCAL']}")
    rows.append(f"| reduce | - | fp32 | - | 4 | 3 | {T.REDUCE_BLOCK} | {cells[0]} | {cells[1]} |")
    # the prepared step's kernels and the large-anchor path (fp32 params; U fp32/bf16; ieee and tensor cores)
    for block_r in (16, 64):
        for udt in ("fp32", "bf16"):
            for precision in ["ieee", *TC_PRECISIONS[:1]]:
                u_dtype = getattr(tl, _TL[udt])
                for fn, (const, options), name in (
                    (T._factor_kernel, factor_variant(block_r, False, True, tl.float32, u_dtype, precision,
                                                      split=False, grad_scale=True),
                     f"B rows update, tiled P', {precision}"),
                    (T._p_tile_kernel, ptile_variant(block_r, tl.float32, u_dtype, precision),
                     f"P' tiles, {precision}"),
                ):
                    cells = []
                    for arch in ARCHS:
                        u = resource_usage(compile_kernel(fn, const, options, arch).asm["cubin"])
                        cells.append(f"{u['REG']}/{u['STACK']}/{u['LOCAL']}")
                    tile = (f"{const['BLOCK_KP']}x{block_r}, U chunk {const['BLOCK_M']}x{const['BLOCK_KP']}"
                            if "BLOCK_KP" in const else f"{const['BLOCK_ROWS']}x{block_r}")
                    rows.append(f"| {name} | {block_r} | fp32 | {udt} | {options['num_warps']} | "
                                f"{options['num_stages']} | {tile} | {cells[0]} | {cells[1]} |")
                    print(rows[-1], file=sys.stderr, flush=True)
        const, options = terms_variant(block_r)
        cells = []
        for arch in ARCHS:
            u = resource_usage(compile_kernel(T._terms_kernel, const, options, arch).asm["cubin"])
            cells.append(f"{u['REG']}/{u['STACK']}/{u['LOCAL']}")
        rows.append(f"| terms | {block_r} | fp32 | - | {options['num_warps']} | {options['num_stages']} | "
                    f"P chunk {const['BLOCK_K']}x{block_r} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def _stages_table() -> str:
    """Markdown table: REG/STACK/LOCAL of each factor-kernel variant (U fp32) for
    ``num_stages`` 1, 2 and 3, everything else at the default; ``*`` marks the default."""
    stages = (1, 2, 3)
    rows = ["| kernel | padded r | params | num_warps | " + " | ".join(
        f"stages {s}: sm_80 / sm_90" for s in stages) + " |", "|---|---|---|---|" + "---|" * len(stages)]
    for update, factor_a, block_r, pdt, udt in _variants():
        if udt != "fp32" or (pdt == "fp16" and update):
            continue  # fp16 close to bf16 (default table); bf16 U close to fp32 U
        const, options = factor_variant(block_r, factor_a, update, getattr(tl, _TL[pdt]))
        cells = []
        for s in stages:
            sm80, sm90 = _usage_cells(const, dict(options, num_stages=s))
            cells.append(f"{'*' if s == options['num_stages'] else ''}{sm80} / {sm90}")
        rows.append(f"| {_name(update, factor_a)} | {block_r} | {pdt} | {options['num_warps']} | "
                    + " | ".join(cells) + " |")
        print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    print(_table())
    if "--stages" in sys.argv[1:]:
        print()
        print(_stages_table())
