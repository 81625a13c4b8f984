"""CI smoke of ``bench/``: the suite runs (tiny shapes, ``--benchmark-disable``), the
benchmarked variants compute the same step as the published formula, and the report
writer turns a results file into correct ratios, a PNG and the performance page."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from asft_kernels.errors import AsFTError  # noqa: E402
from bench import harness, report  # noqa: E402


def test_bench_suite_runs_with_benchmarks_disabled():
    env = dict(os.environ, ASFT_BENCH_SUITE="smoke", ASFT_BENCH_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--benchmark-disable", "-q", "-p", "no:cacheprovider",
         "-W", "ignore::FutureWarning"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"\d+ passed", out) and not re.search(r"\d+ (failed|errors?)\b", out), out[-4000:]


def test_triton_step_host_work_has_fixed_launches_and_ops():
    """``bench/triton_host.py`` (interpreter, launches counted instead of run): a whole
    triton optimizer step makes the same launches and torch ops at 2 and 12 pairs."""
    pytest.importorskip("asft_kernels.ops.triton.launch")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "bench/triton_host.py", "--pairs", "2", "12", "--calls", "2", "--runs", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if re.match(r"\d+ \| ", line)]
    assert [int(r[0]) for r in rows] == [2, 12]
    (launches_2, ops_2), (launches_12, ops_12) = [(int(r[3]), int(r[4])) for r in rows]
    # the terms launch (counters, bias corrections, terms), B and A factor kernels, the P' tiles
    # (64 rows < 32·max(k, r): layout.p_split), one reduction
    assert launches_2 == launches_12 == 5
    assert ops_2 == ops_12 > 0
    assert all(float(x) > 0 for r in rows for x in r[1:3])


def test_triton_suite_rows_keep_skips_and_errors(capsys):
    """``bench/triton_suite.py``'s row bookkeeping: a skipped case, a failing one and a good
    one each leave their row (in order, printed as JSON lines); the next case still runs."""
    from bench import triton_suite

    rows, cpu = [], torch.device("cpu")
    with triton_suite._recorded(rows, {"case": 1}, cpu, skip=(LookupError,), timed=True):
        raise KeyError("absent")
    with triton_suite._recorded(rows, {"case": 2}, cpu):
        raise RuntimeError("boom")
    with triton_suite._recorded(rows, {"case": 3}, cpu) as row:
        row["host_ms"] = 1.5
    assert rows[0]["skipped"] == "'absent'" and rows[0]["setup_and_run_s"] >= 0 and "error" not in rows[0]
    assert rows[1] == {"case": 2, "error": "RuntimeError: boom"}
    assert rows[2] == {"case": 3, "host_ms": 1.5}
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows


def test_triton_suite_smoke_writes_outside_the_published_results():
    """``triton_suite.py --smoke`` without ``--out`` writes into a new temporary directory
    (named on stderr), not bench/results/gpu."""
    pytest.importorskip("triton")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "bench/triton_suite.py", "--smoke", "--parts", "bench", "--variants",
                           "floor"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = Path(re.search(r"results in (\S+)", proc.stderr).group(1))
    try:
        assert not out.resolve().is_relative_to(ROOT.resolve())
        rows = json.loads((out / "triton_bench.json").read_text())["rows"]
        assert [r["variant"] for r in rows] == ["floor", "floor"] and all(r["host_ms"] > 0 for r in rows)
    finally:
        for f in out.iterdir():
            f.unlink()
        out.rmdir()


def test_smoke_suite_is_not_collected_by_default():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


@pytest.mark.parametrize("shape", harness.suite_shapes("smoke"), ids=lambda s: s.group)
def test_benchmarked_variants_match_published_formula(shape):
    """Two steps of each anchored variant equal two steps of paper_eager (float64)."""
    device, dtype = torch.device("cpu"), torch.float64
    anchor = harness.random_anchor(shape)
    finals = {}
    for variant in ("paper_eager", "eager", "cpp", "adamw_fused"):
        try:
            case = harness.build_step_case(variant, shape, device, dtype, anchor=anchor)
        except harness.VariantUnavailable:
            continue
        for _ in range(2):
            case.step()
        finals[variant] = [p.detach().clone() for p in case.params]
    reference = finals.pop("paper_eager")
    plain = finals.pop("adamw_fused")
    # the anchor moves the parameters: otherwise the comparison below would be vacuous
    assert max(float((a - b).abs().max()) for a, b in zip(reference, plain)) > 1e-6
    assert finals, "no anchored variant ran"
    # Adam divides each entry by its own gradient magnitude, so round-off in small gradient
    # entries grows to ~1e-10 absolute; a missing or wrong anchoring term moves ~lr = 1e-3
    for variant, params in finals.items():
        for got, want in zip(params, reference):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8, msg=variant)


def test_floor_bytes_counts_adamw_traffic_and_one_read_of_u():
    shape = harness.StepShape(m=30, n=20, r=3, k=7, layers=2)
    lora = 2 * 3 * (30 + 20)
    # fp32: 3 parameter-sized accesses (param r/w, grad) + 4 fp32 state accesses, U read once
    assert shape.floor_bytes(torch.float32) == lora * 7 * 4 + 2 * 30 * 7 * 4
    # bf16 params keep fp32 moments
    assert shape.floor_bytes(torch.bfloat16) == lora * (3 * 2 + 4 * 4) + 2 * 30 * 7 * 4


def test_peak_step_bytes_sees_a_temporary():
    n = 1 << 16

    def step():
        x = torch.ones(n, dtype=torch.float32)
        return float(x.sum())

    assert harness.peak_step_bytes(step, torch.device("cpu")) >= 4 * n


# ---------------------------------------------------------------------------- report


def _bench(group, variant, median, extra, kind="step"):
    return {
        "group": group, "name": f"test[{group}-{variant}]", "fullname": f"bench::test[{group}-{variant}]",
        "stats": {"median": median, "min": 0.9 * median, "rounds": 7},
        "extra_info": {"kind": kind, "variant": variant, **extra},
    }


def _results(tmp_path: Path) -> tuple[Path, dict]:
    medians = {}
    benches = []
    for m, scale in ((64, 1.0), (128, 3.0)):
        shape = dict(m=m, n=m, r=4, k=8, layers=2)
        group = f"step-m{m}"
        floor_bytes = harness.StepShape(**shape).floor_bytes(torch.float32)
        times = {"paper_eager": 0.5 * scale, "eager": 2e-3 * scale, "cpp": 1e-3 * scale,
                 "adamw_fused": 2.5e-4 * scale, "floor": 1e-4 * scale}
        for variant, t in times.items():
            extra = dict(shape, floor_bytes=floor_bytes, peak_bytes=1000 * m, resident_bytes=10 * m)
            if variant == "floor":
                extra["copy_bytes"] = 2 * floor_bytes
            benches.append(_bench(group, variant, t, extra))
        medians[group] = times
    e2e = {"adamw": 0.2, "cpp": 0.21, "eager": 0.23}
    for variant, t in e2e.items():
        extra = {"hidden": 32, "layers": 2, "backend": variant}
        if variant != "adamw":
            extra["paired_overhead"] = t / 0.2 - 1 + 0.01
        benches.append(_bench("e2e-tiny", variant, t, extra, kind="e2e"))
    medians["e2e-tiny"] = e2e
    data = {"machine_info": {"cpu": {"brand_raw": "Test CPU"}, "cpu_count": 2, "torch_threads": 1,
                             "torch_version": torch.__version__, "dtype": "torch.float32", "suite": "cpu"},
            "commit_info": {"id": "0123456789abcdef", "dirty": False}, "datetime": "2026-01-01T00:00:00",
            "benchmarks": benches}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path, medians


def _row(markdown: str, prefix: str) -> list[str]:
    for line in markdown.splitlines():
        if line.startswith(f"| {prefix} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no table row starting with {prefix!r}")


def test_report_writes_ratios_plot_and_doc(tmp_path, capsys):
    path, medians = _results(tmp_path)
    doc = tmp_path / "docs" / "performance.md"
    assert report.main([str(path), "--doc", str(doc), "--note", "Shared test machine."]) == 0
    md = path.with_suffix(".md").read_text()
    png = path.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert "Test CPU" in md and "Shared test machine." in md
    for m in (64, 128):
        t = medians[f"step-m{m}"]
        row = _row(md, f"{m}×{m}, r=4, k=8, L=2")  # first match: the ratio table
        # fused = cpp (preferred over eager); the floor is the copy time scaled to floor_bytes
        floor = t["floor"] * 0.5
        assert row[1] == "cpp"
        assert row[2] == report._x(t["paper_eager"] / t["cpp"])
        assert row[3] == report._x(t["paper_eager"] / t["eager"])
        assert row[4] == report._x(t["cpp"] / t["adamw_fused"])
        assert row[5] == report._x(t["cpp"] / floor)
    e2e = medians["e2e-tiny"]
    row = _row(md, "eager")
    assert row[5] == report._pct(e2e["eager"] / e2e["adamw"] - 1)
    assert row[6] == report._pct(e2e["eager"] / 0.2 - 1 + 0.01)
    text = doc.read_text()
    link = text.split("](", 1)[1].split(")", 1)[0]
    assert (doc.parent / link).resolve() == path.with_suffix(".png").resolve()
    out = capsys.readouterr().out
    assert f"cpp {report._x(medians['step-m64']['paper_eager'] / medians['step-m64']['cpp'])}" in out


@pytest.mark.parametrize("content", ["missing", "not json", "{}", '{"benchmarks": []}', "no-extra", "negative"])
def test_report_rejects_bad_results_and_writes_nothing(tmp_path, content):
    path = tmp_path / "results.json"
    if content == "no-extra":
        path.write_text(json.dumps({"benchmarks": [{"group": "g", "name": "b", "stats": {"median": 1.0}}]}))
    elif content == "negative":
        good, _ = _results(tmp_path)
        data = json.loads(good.read_text())
        data["benchmarks"][0]["stats"]["median"] = -1.0
        path.write_text(json.dumps(data))
    elif content != "missing":
        path.write_text(content)
    doc = tmp_path / "performance.md"
    doc.write_text("previous page")
    with pytest.raises(AsFTError, match="results.json"):
        report.main([str(path), "--doc", str(doc)])
    assert doc.read_text() == "previous page"
    assert not path.with_suffix(".md").exists() and not path.with_suffix(".png").exists()


def test_report_merges_the_parts_of_one_run(tmp_path, capsys):
    """A run split into stages (``bench/gpu_suite.sh``): the parts merge into one results
    file whose tables equal those of the unsplit file."""
    whole, medians = _results(tmp_path)
    data = json.loads(whole.read_text())
    parts = []
    for i, group in enumerate(("step-m64", "step-m128", "e2e-tiny")):
        part = dict(data, benchmarks=[b for b in data["benchmarks"] if b["group"] == group],
                    machine_info=dict(data["machine_info"], suite_wall_s=10.0 * (i + 1)))
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps(part))
    merged = tmp_path / "merged.json"
    assert report.main([*map(str, parts), "--json", str(merged)]) == 0
    assert report.load_results(merged).groups.keys() == report.load_results(whole).groups.keys()
    assert json.loads(merged.read_text())["machine_info"]["suite_wall_s"] == 60.0
    row = _row(merged.with_suffix(".md").read_text(), "128×128, r=4, k=8, L=2")
    assert row[2] == report._x(medians["step-m128"]["paper_eager"] / medians["step-m128"]["cpp"])

    # a part of another machine, or one repeating a benchmark, is refused; nothing is written
    other = json.loads(parts[1].read_text())
    other["machine_info"]["node"] = "elsewhere"
    parts[1].write_text(json.dumps(other))
    for bad in ([parts[0], parts[1]], [parts[0], parts[0]]):
        out = tmp_path / "refused.json"
        with pytest.raises(AsFTError, match="part"):
            report.main([*map(str, bad), "--json", str(out)])
        assert not out.exists() and not out.with_suffix(".md").exists()
    with pytest.raises(SystemExit):
        report.main([str(parts[0]), str(parts[2])])  # several parts need --json


def _phase_rows(out: str) -> list[dict[str, float]]:
    """The tables of ``bench/cpp_phases.py``: one ``{phase: ms per call}`` per table."""
    tables: list[dict[str, float]] = []
    for line in out.splitlines():
        if line.startswith("  phase "):
            tables.append({})
        match = re.match(r"^  (\S.*?)\s+(\d+\.\d+)\s+(\d+\.\d+)%", line)
        if match and tables:
            tables[-1][match.group(1)] = float(match.group(2))
    return tables


def test_cpp_phase_clock_accounts_for_the_call():
    """``bench/cpp_phases.py`` builds the kernels with the phase clock and times every phase:
    each phase of the kernel and of the one-call step runs, the phases of the blocks make up
    the parallel region, which sits inside the op, which sits inside the call."""
    from asft_kernels.ops import cpp

    if not cpp.is_available():
        pytest.skip("no C++ compiler here: the phase-clock build cannot be made")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    tables = []
    for extra in ([], ["--step"]):
        proc = subprocess.run([sys.executable, "bench/cpp_phases.py", "--shape", "300", "1100", "16", "24", "2",
                               "--calls", "3", "--warm", "--threads", "1", *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        tables += _phase_rows(proc.stdout)
    assert len(tables) == 2
    blocks = cpp.PHASES[:cpp.PHASES.index("reduce partials") + 1]
    for table, step in zip(tables, (False, True)):
        assert set(table) == {"(whole call)", *cpp.PHASES}, table
        assert all(table[name] > 0 for name in blocks), table  # 2 row blocks and 2 column blocks per pair
        assert (table["anchoring terms"] > 0) == step
        inside = sum(table[name] for name in blocks)
        # 1 thread: the blocks' phases cover the parallel region (up to the task loop itself)
        assert 0.7 * table["parallel region"] <= inside <= table["parallel region"] * 1.02 + 0.002, table
        assert table["parallel region"] + table["prepare (checks, scratch)"] <= table["whole op"] * 1.02 + 0.002
        assert table["whole op"] <= table["(whole call)"] * 1.02 + 0.002, table


def test_cpp_phase_clock_build_computes_the_same_step():
    """The phase-clock build runs the same kernels: the fp32 contract tests of
    tests/test_cpp.py (against eager, every shape) pass on it; a normal build refuses to
    read the clock."""
    from asft_kernels.ops import cpp
    from asft_kernels.ops.cpp_build import PHASE_CLOCK_ENV

    if not cpp.is_available():
        pytest.skip("no C++ compiler here: the phase-clock build cannot be made")
    with pytest.raises(RuntimeError, match=PHASE_CLOCK_ENV):
        cpp.phase_times()
    env = dict(os.environ, **{PHASE_CLOCK_ENV: "1"}, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_cpp.py", "-q", "-s", "-p", "no:cacheprovider",
         "-k", "contract_matches_eager and float32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "with the phase clock" in out, out[-4000:]  # the variant was the one loaded
    match = re.search(r"(\d+) passed", out)
    assert match and int(match.group(1)) >= 10 and not re.search(r"\d+ (failed|errors?)\b", out), out[-4000:]
