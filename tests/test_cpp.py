"""The C++ CPU backend: contract outputs against eager, op checks, determinism, fallback.

The trajectory suite of ``tests/test_optim.py`` runs on the ``cpp`` backend through the
``backend`` fixture; this file covers what is specific to the compiled kernels.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from asft_kernels.errors import OptimizerInputError
from asft_kernels.ops import EAGER, AdamWHyper, AnchoredBatch, BucketTensors, cpp, eager, resolve_backend

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# max |cpp − eager| / max |eager| per parameter dtype: the two differ by summation order
# (fp64/fp32 math), and low-precision params by at most one rounding step of the dtype.
TOLERANCE = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# (m, n, r, k): m of 1 and not a multiple of anything; r and k filling whole vectors, parts
# of one and several (register tiles and their remainders, masked tails), r = 64 (the
# largest rank the optimizer sends to the kernel) and one above it (the op still runs it);
# several row blocks (240 rows, sub-tiles of 24) and column blocks (1024)
SHAPES = [
    (1, 1, 1, 1),
    (1, 37, 3, 5),
    (37, 123, 1, 64),
    (37, 5, 16, 7),
    (123, 300, 8, 17),
    (123, 513, 5, 64),
    (123, 1, 2, 1),
    (37, 64, 4, 33),
    (300, 257, 16, 64),
    (130, 40, 13, 9),
    (300, 257, 64, 64),
    (97, 130, 64, 257),
    (45, 70, 33, 19),
    (600, 20, 48, 40),
    (40, 30, 80, 5),
    (30, 2100, 6, 3),
]


def _compiler_present() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(scope="module", autouse=True)
def built():
    """The library must build wherever a compiler exists (CI included): fail, don't skip."""
    if not _compiler_present():
        pytest.skip("no C++ compiler on this machine")
    assert cpp.is_available(), f"C++ backend failed to build: {cpp._State.error}"


def _pairs(shapes, dtype, seed=0):
    """Inputs of the fused op for a batch of pairs (lists in schema order, step 3)."""
    g = torch.Generator().manual_seed(seed)
    md = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape, scale=1.0, dt=md):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    cols = {name: [] for name in ("A", "B", "mA", "vA", "mB", "vB", "P", "G", "M", "gA", "gB", "U", "Q", "R", "H")}
    for m, n, r, k in shapes:
        cols["A"].append(rnd(r, n, dt=dtype))
        cols["B"].append(rnd(m, r, dt=dtype))
        cols["mA"].append(rnd(r, n, scale=0.1))
        cols["vA"].append(rnd(r, n, scale=0.1).square())
        cols["mB"].append(rnd(m, r, scale=0.1))
        cols["vB"].append(rnd(m, r, scale=0.1).square())
        cols["P"].append(torch.zeros(k, r, dtype=md))
        cols["G"].append(torch.zeros(r, r, dtype=md))
        cols["M"].append(torch.zeros(r, r, dtype=md))
        cols["gA"].append(rnd(r, n, dt=dtype))
        cols["gB"].append(rnd(m, r, dt=dtype))
        cols["U"].append(rnd(m, k, scale=m**-0.5))
        cols["Q"].append(rnd(r, r, scale=0.1))
        cols["R"].append(rnd(k, r, scale=0.1))
        cols["H"].append(rnd(r, r, scale=0.1))
    return cols


def _fused(impl, cols, steps=3.0, maximize=False):
    """Run a backend's ``fused_step(batch, hyper)`` on ``cols`` (step_A = steps, step_B = steps + 1)."""
    n = len(cols["A"])
    batch = AnchoredBatch(
        cols["A"], cols["B"], cols["mA"], cols["vA"], cols["mB"], cols["vB"], cols["P"], cols["G"], cols["M"],
        cols["gA"], cols["gB"], cols["U"], cols["Q"], cols["R"], cols["H"],
        [torch.tensor(float(steps)) for _ in range(n)], [torch.tensor(float(steps) + 1) for _ in range(n)])
    impl(batch, AdamWHyper(1e-2, 0.9, 0.999, 1e-8, 0.1, maximize))


def _clone(cols):
    return {k: [t.clone() for t in v] for k, v in cols.items()}


def _assert_close(name, got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    scale = want.double().abs().max().item() or 1.0
    err = (got.double() - want.double()).abs().max().item() / scale
    assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.3g} > {TOLERANCE[dtype]:.0e} ({dtype})"


def _compare(shapes, dtype, maximize=False):
    ref = _pairs(shapes, dtype)
    got = _clone(ref)
    _fused(eager.fused_step, ref, maximize=maximize)
    _fused(cpp.fused_step, got, maximize=maximize)
    for name in ("A", "B", "mA", "vA", "mB", "vB", "P", "G", "M"):
        for j, (g, w) in enumerate(zip(got[name], ref[name])):
            _assert_close(f"{name}[{j}] {shapes[j]}", g, w, dtype)
    # stats pass on the updated parameters
    s_ref = eager.stats_pass(ref["U"], ref["B"], ref["A"])
    s_got = cpp.stats_pass(got["U"], got["B"], got["A"])
    for name, gl, wl in zip("PGM", s_got, s_ref):
        for j, (g, w) in enumerate(zip(gl, wl)):
            _assert_close(f"stats {name}[{j}] {shapes[j]}", g, w, dtype)
    # the fused step's statistics are those of the values it stored
    math_tol = torch.float64 if dtype == torch.float64 else torch.float32
    for name, fused_stats, fresh in zip("PGM", (got["P"], got["G"], got["M"]), s_got):
        for j, (f, s) in enumerate(zip(fused_stats, fresh)):
            _assert_close(f"fused vs fresh {name}[{j}]", f, s, math_tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "m{}n{}r{}k{}".format(*s))
def test_contract_matches_eager(shape, dtype):
    _compare([shape], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_grouped_launch_matches_eager(dtype):
    """All shapes in one call (one grouped launch), with maximize."""
    _compare(SHAPES, dtype, maximize=True)


def test_every_rank_up_to_64_runs_the_kernel():
    """One kernel covers every rank up to FUSED_MAX_RANK = 64; only wider pairs go to eager."""
    from asft_kernels.ops import route

    backend = resolve_backend("cpp", torch.device("cpu"))
    assert cpp.FUSED_MAX_RANK == 64
    for dtype in DTYPES:
        for r in (1, 8, 33, 64):
            assert route(backend, dtype, r) is backend, (dtype, r)
        assert route(backend, dtype, 65) is EAGER


def test_basis_in_bf16_and_strided_small_inputs():
    cols = _pairs([(123, 70, 8, 17)], torch.float32, seed=3)
    cols["U"] = [cols["U"][0].to(torch.bfloat16)]
    cols["Q"] = [cols["Q"][0].T]  # non-contiguous small matrices are accepted
    ref = _clone(cols)
    ref["U"] = [ref["U"][0].float()]
    ref["Q"] = [ref["Q"][0].contiguous()]
    _fused(eager.fused_step, ref)
    _fused(cpp.fused_step, cols)
    for name in ("A", "B", "P", "G", "M"):
        _assert_close(name, cols[name][0], ref[name][0], torch.float32)


def test_dispatch_goes_to_cpp_for_cpu_tensors():
    for op in ("asft::stats_pass", "asft::fused_anchored_adamw_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
        cpu_lines = [ln for ln in torch._C._dispatch_dump(op).splitlines() if ln.startswith("CPU:")]
        assert len(cpu_lines) == 1 and "asft_cpu.cpp" in cpu_lines[0], cpu_lines
    assert resolve_backend("auto", torch.device("cpu")).name == "cpp"
    assert resolve_backend("cpp", torch.device("cpu")).name == "cpp"


def test_opcheck():
    cols = _pairs([(37, 50, 3, 5), (1, 7, 2, 1)], torch.float32, seed=1)
    torch.library.opcheck(torch.ops.asft.stats_pass.default, (cols["U"], cols["B"], cols["A"]))
    args = (cols["A"], cols["B"], cols["mA"], cols["vA"], cols["mB"], cols["vB"], cols["P"], cols["G"], cols["M"],
            cols["gA"], cols["gB"], cols["U"], cols["Q"], cols["R"], cols["H"], [torch.tensor(2.0)] * 2,
            [torch.tensor(2.0)] * 2, 1e-3, 0.9, 0.999, 1e-8, 0.01, False, 2e-3, 0.8, 0.99, 1e-7, 0.0, True)
    torch.library.opcheck(torch.ops.asft.fused_anchored_adamw_.default, args)


def test_bad_input_raises_and_changes_nothing():
    cols = _pairs([(37, 50, 3, 5), (20, 9, 2, 4)], torch.float32, seed=2)
    before = _clone(cols)
    cols["mB"][1] = torch.zeros(21, 2)  # wrong shape in the second pair
    with pytest.raises(OptimizerInputError, match=r"exp_avg_B\[1\].*\(20, 2\).*\(21, 2\)"):
        _fused(cpp.fused_step, cols)
    for name in ("A", "B", "mA", "vA", "P", "G", "M"):
        for g, w in zip(cols[name], before[name]):
            assert torch.equal(g, w), name
    cols["mB"][1] = before["mB"][1].clone()
    cols["gA"][0] = cols["gA"][0].double()
    with pytest.raises(OptimizerInputError, match=r"grad_A\[0\].*Float.*Double"):
        _fused(cpp.fused_step, cols)
    cols["gA"][0] = before["gA"][0].clone()
    cols["B"][0] = torch.randn(3, 37).T  # not contiguous
    with pytest.raises(OptimizerInputError, match=r"B\[0\] must be contiguous"):
        _fused(cpp.fused_step, cols)
    with pytest.raises(OptimizerInputError, match=r"step_A\[0\] must be a one-element fp32/fp64 CPU tensor"):
        cols["B"][0] = before["B"][0].clone()
        batch = AnchoredBatch(*(cols[k] for k in ("A", "B", "mA", "vA", "mB", "vB", "P", "G", "M", "gA", "gB", "U",
                                                  "Q", "R", "H")), [torch.tensor([1, 2])] * 2, [torch.tensor(1.0)] * 2)
        cpp.fused_step(batch, AdamWHyper(1e-3, 0.9, 0.999, 1e-8, 0.0, False))
    with pytest.raises(OptimizerInputError, match="as many U as B"):
        cpp.stats_pass(cols["U"][:1], cols["B"], cols["A"])
    with pytest.raises(OptimizerInputError, match=r"B\[0\] must be fp64/fp32/bf16/fp16"):
        cpp.stats_pass([cols["U"][0]], [torch.zeros(37, 3, dtype=torch.int32)], [torch.zeros(3, 50, dtype=torch.int32)])


_THREADS_CHILD = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    assert torch.get_num_threads() == int(sys.argv[1])
    sys.path.insert(0, sys.argv[3])
    from test_cpp import _fused, _pairs
    from asft_kernels.ops import cpp
    assert cpp.is_available()
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        cols = _pairs([(700, 2100, 8, 64), (300, 600, 5, 17), (129, 257, 16, 3), (530, 300, 64, 70)], dtype,
                      seed=4)
        for step in (1.0, 2.0, 3.0):
            _fused(cpp.fused_step, cols, steps=step)
        stats = cpp.stats_pass(cols["U"], cols["B"], cols["A"])
        for name, ts in list(cols.items()) + list(zip("pgm", stats)):
            for j, t in enumerate(ts):
                out[f"{dtype}.{name}.{j}"] = t
    torch.save(out, sys.argv[2])
    """
)


def test_thread_count_does_not_change_results(tmp_path):
    results = []
    for threads in (1, 2):
        path = tmp_path / f"threads{threads}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(
            [sys.executable, "-c", _THREADS_CHILD, str(threads), str(path), os.path.dirname(__file__)],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "compiling" not in proc.stderr  # the cached library is loaded, not rebuilt
        results.append(torch.load(path, weights_only=True))
    one, two = results
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), f"{key} differs between 1 and 2 threads"


def _no_compiler(monkeypatch, tmp_path):
    """This process's C++ build state reset, and a compiler that does not exist."""
    monkeypatch.setattr(cpp._State, "loaded", None)
    monkeypatch.setattr(cpp._State, "library", None)
    monkeypatch.setattr(cpp._State, "error", None)
    monkeypatch.setattr(cpp._State, "warned", False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))


def test_missing_compiler_falls_back_to_eager_with_one_warning(monkeypatch, tmp_path):
    import asft_kernels as asft

    _no_compiler(monkeypatch, tmp_path)
    with pytest.warns(cpp.CppBackendWarning, match=r"no C\+\+ compiler.*eager") as record:
        assert cpp.is_available() is False
        assert cpp.is_available() is False
        assert resolve_backend("auto", torch.device("cpu")) is EAGER
    assert len([w for w in record if issubclass(w.category, cpp.CppBackendWarning)]) == 1
    with pytest.raises(OptimizerInputError, match="not available"):
        resolve_backend("cpp", torch.device("cpu"))
    with pytest.raises(OptimizerInputError, match="unavailable"):
        cpp.stats_pass([torch.zeros(3, 1)], [torch.zeros(3, 1)], [torch.zeros(1, 2)])
    # the optimizer runs on the eager backend and still anchors
    layer = torch.nn.Linear(6, 5).double()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(layer), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    anchor = asft.AlignmentAnchor.from_deltas({"0": torch.randn(5, 6, dtype=torch.float64)}, rank=3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = asft.AsFTAdamW(params, lr=1e-2, anchor=anchor.bind(model), backend="auto")
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.anchor_loss is not None and float(opt.anchor_loss) > 0
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


def test_cache_key_tracks_torch_version_and_cpu_flags(monkeypatch):
    from asft_kernels.ops import cpp_build

    key = cpp.cache_key()
    assert cpp.cache_dir().name == f"cpu_{key}"
    monkeypatch.setattr(cpp_build, "_cpu_flags", lambda: "sse2")
    other_cpu = cpp.cache_key()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    other_torch = cpp.cache_key()
    assert len({key, other_cpu, other_torch}) == 3


def test_cache_key_covers_the_build_command(monkeypatch, tmp_path):
    """Two checkouts (same sources, other paths), two Python environments or two cache
    roots never share a build directory, so none rewrites the other's build.ninja."""
    from asft_kernels.ops import cpp_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    here = cpp.cache_dir()
    copy = tmp_path / "other_checkout" / "csrc"
    copy.mkdir(parents=True)
    for name in cpp_build.SOURCES:
        shutil.copy(cpp_build.SOURCE_DIR / name, copy / name)
    with monkeypatch.context() as m:
        m.setattr(cpp_build, "SOURCE_DIR", copy)
        other_checkout = cpp.cache_dir()
        assert cpp_build.load_arguments()["sources"] == [str(copy / n) for n in cpp_build.SOURCES]
    with monkeypatch.context() as m:  # an environment with its own torch
        m.setattr(torch, "__file__", str(tmp_path / "venv" / "torch" / "__init__.py"))
        other_env = cpp.cache_dir()
    with monkeypatch.context() as m:  # another interpreter binary
        m.setattr(sys, "_base_executable", str(tmp_path / "python3.12"), raising=False)
        other_python = cpp.cache_dir()
    with monkeypatch.context() as m:
        m.setattr(cpp_build, "CFLAGS", (*cpp_build.CFLAGS, "-DEXTRA"))
        other_flags = cpp.cache_dir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache2"))
    other_root = cpp.cache_dir()
    names = {d.name for d in (here, other_checkout, other_env, other_python, other_flags, other_root)}
    assert len(names) == 6, names
    assert cpp.cache_dir() == other_root  # deterministic


_KEY_CHILD = "import sys; from asft_kernels.ops import cpp_build; print(cpp_build.cache_key(), sys.executable)"


def test_cache_key_is_one_for_every_name_of_the_interpreter(tmp_path):
    """``python``, ``python3``, ``python3.11`` (links to one binary) and the interpreter
    itself compute one key: one build serves ``asft build-ext``, ``python -c`` and the rest."""
    real = os.path.realpath(sys.executable)
    names = [real]
    for name in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        link = tmp_path / "bin" / name
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(real)
        names.append(str(link))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # this process's import path: from inside a virtual environment, the links (to the base
    # binary) see the environment's packages too
    path = os.pathsep.join([root, *(p for p in sys.path if p)])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    keys = {}
    for python in names:
        proc = subprocess.run([python, "-c", _KEY_CHILD], capture_output=True, text=True, timeout=300, env=env,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        key, executable = proc.stdout.split()
        assert executable == python  # each ran under its own name
        keys[python] = key
    assert len(set(keys.values())) == 1, keys
    assert set(keys.values()) == {cpp.cache_key()}


def test_build_ext_command(capsys):
    from asft_kernels.cli import main

    assert main(["build-ext"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("asft build-ext: ") and out.strip().endswith(".so")
    assert os.path.isfile(out.strip().removeprefix("asft build-ext: "))


def test_build_prints_one_line_and_uses_the_keyed_cache(monkeypatch, tmp_path, capsys):
    """The build step itself (compiler replaced by a recorder): one line, keyed directory."""
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or "lib.so")
    monkeypatch.setattr(cpp._State, "loaded", None)
    monkeypatch.setattr(cpp._State, "library", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    cpp.build()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "compiling" in err
    (call,) = calls
    assert call["build_directory"] == str(tmp_path / "asft_kernels" / f"cpu_{cpp.cache_key()}")
    assert call["is_python_module"] is False and "-march=native" in call["extra_cflags"]
    cpp.build()  # loaded: no second build, nothing printed
    assert len(calls) == 1 and capsys.readouterr().err == ""


def _fake_build_dir(tmp_path, monkeypatch):
    """A keyed cache directory holding a built library whose build.ninja only copies a
    source file (``ninja`` decides what is stale; no compiler runs); ``cpp_extension.load``
    replaced by a recorder."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        pytest.skip("ninja is not installed")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = cpp.cache_dir()
    directory.mkdir(parents=True)
    name = f"asft_cpu_{cpp.cache_key()}"
    (directory / "src.cpp").write_text("// source\n")
    (directory / "build.ninja").write_text(
        f"rule copy\n  command = cp $in $out\nbuild {name}.so: copy src.cpp\ndefault {name}.so\n")
    subprocess.run(["ninja", "-C", str(directory)], check=True, capture_output=True)
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or str(directory / f"{name}.so"))
    for attr, value in (("loaded", None), ("library", None), ("error", None)):
        monkeypatch.setattr(cpp._State, attr, value)
    return directory, name, calls


def test_cached_build_prints_nothing_and_a_rebuild_prints_the_line(monkeypatch, tmp_path, capsys):
    directory, name, calls = _fake_build_dir(tmp_path, monkeypatch)
    cpp.build()  # up to date: ninja has no work, nothing is printed
    assert len(calls) == 1 and capsys.readouterr().err == ""
    # a source newer than the library: ninja recompiles, and the line is printed again
    src = directory / "src.cpp"
    stamp = (directory / f"{name}.so").stat().st_mtime_ns + 10**9
    os.utime(src, ns=(stamp, stamp))
    cpp._State.loaded = None
    cpp.build()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"compiling the C++ CPU kernels into {directory}" in err
    assert len(calls) == 2


def test_unforeseen_rebuild_still_prints_the_line(monkeypatch, tmp_path, capsys):
    """ninja saw nothing to do, yet the library was rewritten by the load: the line is
    printed after the fact."""
    from torch.utils import cpp_extension

    directory, name, calls = _fake_build_dir(tmp_path, monkeypatch)
    library = directory / f"{name}.so"

    def rebuilding_load(**kw):
        calls.append(kw)
        stamp = library.stat().st_mtime_ns + 10**9
        os.utime(library, ns=(stamp, stamp))
        return str(library)

    monkeypatch.setattr(cpp_extension, "load", rebuilding_load)
    cpp.build()
    err = capsys.readouterr().err
    assert len(calls) == 1 and len(err.strip().splitlines()) == 1 and "compiling" in err


# ---------------------------------------------------------------------------------------
# asft::anchored_adamw_step_: the backend step of a bucket (counters, terms, fused update)

BUCKET_SHAPES = {  # (m, n) per pair, then the bucket's (r, k)
    "narrow": ([(37, 50), (123, 300), (1, 7), (300, 257)], (3, 5)),
    "wide": ([(45, 70), (130, 40), (600, 20)], (33, 19)),
}


def _bucket(dtype, shape="narrow", steps=3.0, seed=3):
    """A prepared-step input: BucketTensors with statistics of the current parameters,
    counters (A's = steps, B's = steps + 1), gradients and 2λ·coef per pair."""
    mn, (r, k) = BUCKET_SHAPES[shape]
    cols = _pairs([(m, n, r, k) for m, n in mn], dtype, seed=seed)
    md = torch.float64 if dtype == torch.float64 else torch.float32
    L = len(mn)
    P, G, M = (torch.stack(eager.stats_pass(cols["U"], cols["B"], cols["A"])[i]) for i in range(3))
    g = torch.Generator().manual_seed(seed + 1)
    c = torch.rand(L, k, 1, generator=g, dtype=torch.float64).to(md)
    bucket = BucketTensors(cols["A"], cols["B"], cols["mA"], cols["vA"], cols["mB"], cols["vB"], cols["U"],
                           P.contiguous(), G.contiguous(), M.contiguous(), 2 * c - c * c)
    counters = torch.tensor([steps] * L + [steps + 1] * L, dtype=torch.float32)
    scale = torch.tensor([0.3 * (1 + j) for j in range(L)], dtype=md)
    return bucket, counters, cols["gA"], cols["gB"], scale


HYPER_A = AdamWHyper(1e-2, 0.9, 0.999, 1e-8, 0.1, False)
HYPER_B = AdamWHyper(3e-2, 0.8, 0.99, 1e-6, 0.0, True)


def _copy(args):
    bucket, counters, gA, gB, scale = args
    cl = lambda xs: [x.clone() for x in xs]  # noqa: E731
    t = BucketTensors(cl(bucket.A), cl(bucket.B), cl(bucket.exp_avg_A), cl(bucket.exp_avg_sq_A),
                      cl(bucket.exp_avg_B), cl(bucket.exp_avg_sq_B), cl(bucket.U), bucket.P.clone(),
                      bucket.G.clone(), bucket.M.clone(), bucket.w.clone())
    return t, counters.clone(), cl(gA), cl(gB), scale.clone()


def _written(bucket, counters):
    return {"A": bucket.A, "B": bucket.B, "exp_avg_A": bucket.exp_avg_A, "exp_avg_sq_A": bucket.exp_avg_sq_A,
            "exp_avg_B": bucket.exp_avg_B, "exp_avg_sq_B": bucket.exp_avg_sq_B,
            "P": [bucket.P], "G": [bucket.G], "M": [bucket.M], "counters": [counters]}


@pytest.mark.parametrize("shape", list(BUCKET_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_step_is_terms_counters_and_fused_step(dtype, shape):
    """cpp.step equals what it replaces: bitwise against the C++ terms + counter increment +
    C++ fused step, and within the usual tolerance against the eager backend's step; A and B
    take their own hyperparameters."""
    args = _bucket(dtype, shape)
    one, three, ref, op = _copy(args), _copy(args), _copy(args), _copy(args)
    R_one = cpp.step(cpp.prepare(one[0], one[1]), one[2], one[3], one[4], HYPER_A, HYPER_B)
    # the list op (the surface torch.compile and opcheck see) runs the same code
    b, counters, gA, gB, scale = op
    R_op = torch.ops.asft.anchored_adamw_step_(b.A, b.B, b.exp_avg_A, b.exp_avg_sq_A, b.exp_avg_B, b.exp_avg_sq_B,
                                               b.P, b.G, b.M, gA, gB, b.U, b.w, scale, counters,
                                               *HYPER_A.op_args(), *HYPER_B.op_args(), None, None)
    assert torch.equal(R_one, R_op)
    for name, xs in _written(op[0], op[1]).items():
        assert all(torch.equal(x, y) for x, y in zip(xs, _written(one[0], one[1])[name])), name
    # the same work in three calls
    b, counters, gA, gB, scale = three
    L, k, r = b.P.shape
    Q, R, H = torch.empty(L, r, r, dtype=b.P.dtype), torch.empty(L, k, r, dtype=b.P.dtype), \
        torch.empty(L, r, r, dtype=b.P.dtype)
    R_three = cpp.terms(b.P, b.G, b.M, b.w, scale[:, None, None].contiguous(), Q, R, H)
    counters.add_(1)
    batch = AnchoredBatch(b.A, b.B, b.exp_avg_A, b.exp_avg_sq_A, b.exp_avg_B, b.exp_avg_sq_B, list(b.P), list(b.G),
                          list(b.M), gA, gB, b.U, list(Q), list(R), list(H), list(counters[:L]), list(counters[L:]))
    cpp.fused_step(batch, HYPER_A, HYPER_B)
    R_ref = eager.step(eager.prepare(ref[0], ref[1]), ref[2], ref[3], ref[4], HYPER_A, HYPER_B)
    md = torch.float64 if dtype == torch.float64 else torch.float32
    assert R_one.shape == () and R_one.dtype == md == R_ref.dtype
    assert abs(float(R_one) - float(R_three)) <= 1e-6 * abs(float(R_three))
    _assert_close("R", R_one, R_ref, md)
    for (name, xs), ys, zs in zip(_written(one[0], one[1]).items(), _written(three[0], three[1]).values(),
                                  _written(ref[0], ref[1]).values()):
        for j, (a, b_, c) in enumerate(zip(xs, ys, zs)):
            assert torch.equal(a, b_), f"{name}[{j}]"
            _assert_close(f"{name}[{j}] vs eager", a, c, dtype if name in ("A", "B") else md)
    assert one[1].tolist() == [4.0] * L + [5.0] * L


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_step_unscales_inside_and_skips_on_found_inf(dtype):
    """grad_scale: the step equals a step on gradients divided by the scale (a power of two:
    bitwise), the gradient tensors unchanged; found_inf: nothing written, R returned."""
    args = _bucket(dtype, seed=7)
    scaled, plain, skipped = _copy(args), _copy(args), _copy(args)
    s = torch.tensor(1024.0)
    grads = [x * 1024 for x in scaled[2]], [x * 1024 for x in scaled[3]]
    before = [[x.clone() for x in g] for g in grads]
    R1 = cpp.step(cpp.prepare(scaled[0], scaled[1]), *grads, scaled[4], HYPER_A, HYPER_B, grad_scale=s,
                  found_inf=torch.tensor(0.0))
    R2 = cpp.step(cpp.prepare(plain[0], plain[1]), plain[2], plain[3], plain[4], HYPER_A, HYPER_B)
    assert torch.equal(R1, R2)
    assert all(torch.equal(x, y) for g, h in zip(grads, before) for x, y in zip(g, h))
    for xs, ys in zip(_written(scaled[0], scaled[1]).values(), _written(plain[0], plain[1]).values()):
        assert all(torch.equal(x, y) for x, y in zip(xs, ys))
    snap = {name: [x.clone() for x in xs] for name, xs in _written(skipped[0], skipped[1]).items()}
    versions = [x._version for xs in _written(skipped[0], skipped[1]).values() for x in xs]
    R3 = cpp.step(cpp.prepare(skipped[0], skipped[1]), skipped[2], skipped[3], skipped[4], HYPER_A, HYPER_B,
                  grad_scale=s, found_inf=torch.tensor(1.0))
    assert torch.equal(R3, R2)
    for (name, xs), ys in zip(_written(skipped[0], skipped[1]).items(), snap.values()):
        assert all(torch.equal(x, y) for x, y in zip(xs, ys)), name
    assert [x._version for xs in _written(skipped[0], skipped[1]).values() for x in xs] == versions


def test_anchored_step_opcheck_and_bad_input_changes_nothing():
    b, counters, gA, gB, scale = _bucket(torch.float32, seed=1)
    hyper = (*HYPER_A.op_args(), *HYPER_B.op_args())
    head = (b.A, b.B, b.exp_avg_A, b.exp_avg_sq_A, b.exp_avg_B, b.exp_avg_sq_B, b.P, b.G, b.M, gA, gB, b.U, b.w, scale,
            counters)
    for tail in ((None, None), (torch.tensor(8.0), torch.tensor(0.0)), (None, torch.tensor(1.0))):
        torch.library.opcheck(torch.ops.asft.anchored_adamw_step_.default, (*head, *hyper, *tail))
    b, counters, gA, gB, scale = _bucket(torch.float32, seed=2)
    handle = cpp.prepare(b, counters)
    before = {name: [x.clone() for x in xs] for name, xs in _written(b, counters).items()}
    with pytest.raises(OptimizerInputError, match=r"grad_B\[1\] must have shape \(123, 3\)"):
        cpp.step(handle, gA, [gB[0], gB[0]] + gB[2:], scale, HYPER_A, HYPER_B)
    with pytest.raises(OptimizerInputError, match=r"scale must have shape \(L,\) = \(4,\)"):
        cpp.step(handle, gA, gB, scale[:2], HYPER_A, HYPER_B)
    with pytest.raises(OptimizerInputError, match=r"grad_A\[2\] must be contiguous"):
        cpp.step(handle, gA[:2] + [torch.zeros(7, 3).T] + gA[3:], gB, scale, HYPER_A, HYPER_B)
    with pytest.raises(OptimizerInputError, match="grad_scale must be a one-element fp32"):
        cpp.step(handle, gA, gB, scale, HYPER_A, HYPER_B, grad_scale=torch.tensor(2.0, dtype=torch.float64))
    with pytest.raises(OptimizerInputError, match=r"w must have shape \(L, k, 1\)"):
        cpp.prepare(BucketTensors(b.A, b.B, b.exp_avg_A, b.exp_avg_sq_A, b.exp_avg_B, b.exp_avg_sq_B, b.U, b.P, b.G,
                                  b.M, b.w[:, :2]), counters)
    for (name, xs), ys in zip(_written(b, counters).items(), before.values()):  # counters included
        assert all(torch.equal(x, y) for x, y in zip(xs, ys)), name



def test_prepared_bucket_refuses_a_swapped_tensor_and_writes_nothing():
    """The handle re-checks by pointer: a held tensor whose storage or dtype changed after
    prepare (``p.data = ...``) is refused, naming it, before anything is written."""
    b, counters, gA, gB, scale = _bucket(torch.float32, seed=3)
    handle = cpp.prepare(b, counters)
    cpp.step(handle, gA, gB, scale, HYPER_A, HYPER_B)
    b.A[1].data = b.A[1].data.clone()  # same values, another storage
    before = {name: [x.clone() for x in xs] for name, xs in _written(b, counters).items()}
    with pytest.raises(OptimizerInputError, match=r"A\[1\] is no longer the tensor the bucket was prepared with"):
        cpp.step(handle, gA, gB, scale, HYPER_A, HYPER_B)
    b2, counters2, gA2, gB2, scale2 = _bucket(torch.float32, seed=4)
    handle2 = cpp.prepare(b2, counters2)
    b2.exp_avg_B[0].data = b2.exp_avg_B[0].data.double()
    with pytest.raises(OptimizerInputError, match=r"exp_avg_B\[0\] is no longer .* now Double"):
        cpp.step(handle2, gA2, gB2, scale2, HYPER_A, HYPER_B)
    for (name, xs), ys in zip(_written(b, counters).items(), before.values()):
        assert all(torch.equal(x, y) for x, y in zip(xs, ys)), name
    # prepared again, it steps
    cpp.step(cpp.prepare(b, counters), gA, gB, scale, HYPER_A, HYPER_B)
    assert not torch.equal(b.A[1], before["A"][1])


def test_prepared_step_is_seen_by_the_profiler():
    b, counters, gA, gB, scale = _bucket(torch.float32, seed=5)
    handle = cpp.prepare(b, counters)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cpp.step(handle, gA, gB, scale, HYPER_A, HYPER_B)
    assert [e.name for e in prof.events() if e.name.startswith("asft::")] == ["asft::CpuBucket.step"]


def _one_layer_lora():
    from peft import LoraConfig, get_peft_model

    import asft_kernels as asft

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 5).double()),
                           LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    anchor = asft.AlignmentAnchor.from_deltas({"0": torch.randn(5, 6, dtype=torch.float64)}, rank=3,
                                              dtype=torch.float64)
    return model, anchor.bind(model), [p for p in model.parameters() if p.requires_grad]


def test_explicit_cpp_without_compiler_is_one_error_at_construction(monkeypatch, tmp_path):
    """backend="cpp" where the build fails: one OptimizerInputError when the optimizer is
    built, naming the cause, and no warning that speaks of an eager fallback; backend="auto"
    afterwards still gets its one warning naming the cause."""
    import warnings

    import asft_kernels as asft

    _no_compiler(monkeypatch, tmp_path)
    model, binding, params = _one_layer_lora()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(OptimizerInputError, match=r"backend 'cpp' is not available.*no C\+\+ compiler.*"
                                                      r"no-such-compiler"):
            asft.AsFTAdamW(params, lr=1e-2, anchor=binding, backend="cpp")
    assert [w for w in record if issubclass(w.category, cpp.CppBackendWarning)] == []
    with pytest.warns(cpp.CppBackendWarning, match=r"no C\+\+ compiler.*no-such-compiler.*eager") as record:
        opt = asft.AsFTAdamW(params, lr=1e-2, anchor=binding, backend="auto")
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.step()
    assert len([w for w in record if issubclass(w.category, cpp.CppBackendWarning)]) == 1
    assert [b.backend.name for b in opt._plan.buckets] == ["eager"] and float(opt.anchor_loss) > 0


def test_auto_without_compiler_warns_once_naming_the_cause(monkeypatch, tmp_path):
    """The build made to fail by a monkeypatched compile step: auto gives one warning
    naming the cause and trains on eager, matching AdamW on task + R."""
    import asft_kernels as asft
    from asft_kernels.ops import cpp_build
    from asft_kernels.reference import paper_regularizer

    _no_compiler(monkeypatch, tmp_path)
    monkeypatch.setenv("CXX", shutil.which("c++") or shutil.which("g++") or sys.executable)

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension 'asft_cpu': simulated compiler failure")

    monkeypatch.setattr("torch.utils.cpp_extension.load", failing_load)
    monkeypatch.setattr(cpp_build, "_will_compile", lambda *a: False)
    m1, b1, p1 = _one_layer_lora()
    m2, b2, p2 = _one_layer_lora()
    with pytest.warns(cpp.CppBackendWarning, match="simulated compiler failure") as record:
        o1 = asft.AsFTAdamW(p1, lr=1e-2, anchor=b1, backend="auto")
        o2 = torch.optim.AdamW(p2, lr=1e-2)
        x = torch.randn(4, 6, dtype=torch.float64)
        for _ in range(3):
            for m, o, extra in ((m1, o1, None), (m2, o2, b2)):
                o.zero_grad()
                loss = m(x).pow(2).mean()
                if extra is not None:
                    loss = loss + paper_regularizer(extra, 1.0)
                loss.backward()
                o.step()
    assert len([w for w in record if issubclass(w.category, cpp.CppBackendWarning)]) == 1
    for p, q in zip(p1, p2):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
