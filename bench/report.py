"""Turn pytest-benchmark results of ``bench/`` into markdown tables of ratios and a plot.

Usage::

    python -m bench.report RESULTS.json                      # RESULTS.md + RESULTS.png beside it
    python -m bench.report RESULTS.json --markdown T.md --plot P.png --doc docs/performance.md
    python -m bench.report PART1.json PART2.json --json RESULTS.json   # parts of one run, merged first

Every ratio compares medians measured in the same run (docs/method.md): for each shape,
the speed-up of the fused step (``triton``, else ``cpp``, else ``eager``) over
``paper_eager``, the fused step against ``torch.optim.AdamW(fused=True)`` on the same
parameters, and each step time against the memory floor (bytes one step must move ÷
the bandwidth of a ``copy_`` of as many bytes, timed in the same run). The end-to-end
table gives each optimizer's whole training step against ``torch.optim.AdamW``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from asft_kernels.anchor import atomic_write
from asft_kernels.errors import AsFTError

STEP_ORDER = ("paper_eager", "eager", "cpp", "triton", "adamw_fused", "floor")
E2E_ORDER = ("adamw", "paper_eager", "eager", "cpp", "triton")
FUSED_PREFERENCE = ("triton", "cpp", "eager")
MIB = 1024 * 1024


@dataclass
class Measurement:
    """One benchmark: median and min step time in seconds, rounds, and its ``extra_info``."""

    name: str
    group: str
    variant: str
    kind: str
    median_s: float
    min_s: float
    rounds: int
    extra: dict = field(default_factory=dict)


@dataclass
class Results:
    """A validated results file: measurements by group, machine and commit facts."""

    path: Path
    groups: dict[str, dict[str, Measurement]]
    machine: dict
    commit: dict
    datetime: str

    def kind_groups(self, kind: str) -> list[tuple[str, dict[str, Measurement]]]:
        """Groups of ``kind`` (``step`` or ``e2e``), steps ordered by (layers, r, k, m)."""
        out = [(g, ms) for g, ms in self.groups.items() if next(iter(ms.values())).kind == kind]
        if kind == "step":
            out.sort(key=lambda item: _shape_key(next(iter(item[1].values())).extra))
        return out


def _shape_key(extra: dict) -> tuple:
    return (extra.get("layers", 0), extra.get("r", 0), extra.get("k", 0), extra.get("m", 0), extra.get("n", 0))


def _read_json(path: Path):
    """The parsed JSON of ``path``; AsFTError naming the file if it is missing or unreadable."""
    if not path.is_file():
        raise AsFTError(f"results file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AsFTError(f"results file {str(path)!r} is not readable JSON: {exc}") from exc


def load_results(path: str | os.PathLike, data: dict | None = None) -> Results:
    """Read and validate a ``pytest-benchmark --benchmark-json`` file written by ``bench/``
    (``data``: its contents, already parsed; ``path`` then only names it).

    Raises:
        AsFTError: missing or unreadable file, no benchmarks, or a benchmark without the
            fields this report needs (the message names the file and the benchmark).
    """
    path = Path(path)
    if data is None:
        data = _read_json(path)
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benchmarks, list) or not benchmarks:
        raise AsFTError(f"results file {str(path)!r} holds no 'benchmarks' (was it written with --benchmark-json?)")
    groups: dict[str, dict[str, Measurement]] = {}
    for i, bench in enumerate(benchmarks):
        name = bench.get("name", f"#{i}") if isinstance(bench, dict) else f"#{i}"
        try:
            extra = bench["extra_info"]
            stats = bench["stats"]
            meas = Measurement(name=str(name), group=str(bench["group"]), variant=str(extra["variant"]),
                               kind=str(extra["kind"]), median_s=float(stats["median"]), min_s=float(stats["min"]),
                               rounds=int(stats["rounds"]), extra=dict(extra))
        except (KeyError, TypeError, ValueError) as exc:
            raise AsFTError(f"results file {str(path)!r}, benchmark {name!r}: missing or bad field {exc}") from exc
        if not (math.isfinite(meas.median_s) and meas.median_s > 0):
            raise AsFTError(f"results file {str(path)!r}, benchmark {name!r}: median {meas.median_s} is not positive")
        if meas.kind not in ("step", "e2e", "host"):
            raise AsFTError(f"results file {str(path)!r}, benchmark {name!r}: unknown kind {meas.kind!r}")
        if meas.kind == "step":
            for key in ("m", "n", "r", "k", "layers", "floor_bytes"):
                if not isinstance(extra.get(key), int):
                    raise AsFTError(f"results file {str(path)!r}, benchmark {name!r}: extra_info lacks int {key!r}")
        group = groups.setdefault(meas.group, {})
        if meas.variant in group:
            raise AsFTError(f"results file {str(path)!r}: group {meas.group!r} holds variant {meas.variant!r} twice")
        group[meas.variant] = meas
    return Results(path, groups, dict(data.get("machine_info") or {}), dict(data.get("commit_info") or {}),
                   str(data.get("datetime", "")))


#: ``machine_info`` keys that must agree between the parts of one run (:func:`merge_results`).
SAME_MACHINE_KEYS = ("node", "cuda_device", "torch_version", "suite", "dtype")


def merge_results(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> Results:
    """Write the benchmarks of several ``--benchmark-json`` files of one machine and one
    checkout (a run split into stages) into one results file ``out``; return its results.

    ``machine_info`` comes from the first file, with ``suite_wall_s`` summed over the parts
    and ``loadavg_start``/``loadavg_end`` taken from the first and the last part.

    Raises:
        AsFTError: a part is missing or unreadable, holds no benchmarks, comes from another
            machine (:data:`SAME_MACHINE_KEYS`) or commit, or repeats a benchmark of an
            earlier part (nothing written).
    """
    parts = []
    for path in map(Path, paths):
        data = _read_json(path)
        load_results(path, data)  # validates each part, naming its file
        parts.append((path, data))
    first_path, merged = parts[0]
    machine = dict(merged.get("machine_info") or {})
    commit = (merged.get("commit_info") or {}).get("id")
    names = set()
    benchmarks = []
    for path, data in parts:
        info = data.get("machine_info") or {}
        for key in SAME_MACHINE_KEYS:
            if info.get(key) != machine.get(key):
                raise AsFTError(f"results file {str(path)!r}: machine_info[{key!r}] = {info.get(key)!r}, but "
                                f"{str(first_path)!r} has {machine.get(key)!r}; parts of one run must share it")
        if (data.get("commit_info") or {}).get("id") != commit:
            raise AsFTError(f"results file {str(path)!r} comes from another commit than {str(first_path)!r}")
        for bench in data["benchmarks"]:
            if bench.get("fullname") in names:
                raise AsFTError(f"results file {str(path)!r} repeats benchmark {bench.get('fullname')!r}")
            names.add(bench.get("fullname"))
            benchmarks.append(bench)
    if all("suite_wall_s" in (d.get("machine_info") or {}) for _, d in parts):
        machine["suite_wall_s"] = round(sum(d["machine_info"]["suite_wall_s"] for _, d in parts), 1)
    if "loadavg_end" in (parts[-1][1].get("machine_info") or {}):
        machine["loadavg_end"] = parts[-1][1]["machine_info"]["loadavg_end"]
    merged = dict(merged, machine_info=machine, benchmarks=benchmarks)
    out = Path(out)
    results = load_results(out, merged)  # validated before it is written
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(merged, indent=1)))
    return results


# ---------------------------------------------------------------------------- numbers


def fused_variant(group: dict[str, Measurement]) -> str | None:
    """The fused step of a group: ``triton``, else ``cpp``, else ``eager`` (None if absent)."""
    for name in FUSED_PREFERENCE:
        if name in group:
            return name
    return None


def floor_seconds(group: dict[str, Measurement]) -> float | None:
    """Time the group's step must take at the measured copy bandwidth: ``floor_bytes ÷
    (copy_bytes / copy median)``; None without a ``floor`` row."""
    floor = group.get("floor")
    if floor is None or not floor.extra.get("copy_bytes"):
        return None
    return floor.median_s * floor.extra["floor_bytes"] / floor.extra["copy_bytes"]


def ratio(num: Measurement | None, den: Measurement | float | None) -> float | None:
    """``num.median / den.median`` (den may be seconds); None if either is missing."""
    if num is None or den is None:
        return None
    d = den if isinstance(den, float) else den.median_s
    return num.median_s / d if d > 0 else None


def _rounded(value: float, most_decimals: int) -> str:
    """``value`` with 0 decimals (thousands separated) from 100 on, 1 from 10, 2 from 1, 3
    below, but never more than ``most_decimals``."""
    decimals = min(0 if value >= 100 else 1 if value >= 10 else 2 if value >= 1 else 3, most_decimals)
    return f"{value:,.0f}" if decimals == 0 else f"{value:.{decimals}f}"


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else _rounded(seconds * 1e3, 3)


def _x(value: float | None) -> str:
    return "—" if value is None else _rounded(value, 2) + "×"


def _bytes(nbytes: int | None) -> str:
    if nbytes is None:
        return "—"
    for unit, size in (("GiB", 1024**3), ("MiB", MIB), ("KiB", 1024)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"
    return f"{int(nbytes)} B"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:+.1f} %"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _shape_label(extra: dict) -> str:
    return f"{extra['m']}×{extra['n']}, r={extra['r']}, k={extra['k']}, L={extra['layers']}"


# ---------------------------------------------------------------------------- markdown


def machine_line(results: Results) -> str:
    """One line with the machine, versions, commit and date of the run."""
    m = results.machine
    cpu = (m.get("cpu") or {}).get("brand_raw") or m.get("processor") or m.get("machine") or "unknown CPU"
    parts = [f"{cpu}, {m.get('cpu_count', '?')} cores, {m.get('torch_threads', '?')} torch thread(s)"]
    if m.get("cuda_device"):
        driver = f", driver {m['cuda_driver']}" if m.get("cuda_driver") else ""
        parts.append(f"GPU {m['cuda_device']} (CUDA {m.get('cuda_version')}{driver})")
    parts.append(f"Python {m.get('python_version', '?')}")
    for pkg in ("torch", "triton", "transformers", "peft", "pytest-benchmark"):
        if m.get(f"{pkg}_version"):
            parts.append(f"{pkg} {m[f'{pkg}_version']}")
    parts.append(f"parameters {m.get('dtype', '?').removeprefix('torch.')}")
    if m.get("loadavg_start") is not None:
        parts.append(f"1-min load average {m['loadavg_start']} at start, {m.get('loadavg_end')} at end")
    if m.get("suite_wall_s") is not None:
        parts.append(f"suite wall time {m['suite_wall_s'] / 60:.1f} min")
    commit = results.commit.get("id")
    if commit:
        parts.append(f"commit {commit[:10]}" + (" (dirty tree)" if results.commit.get("dirty") else ""))
    if results.datetime:
        parts.append(results.datetime[:19].replace("T", " ") + " UTC")
    return "; ".join(parts)


def step_tables(results: Results) -> str:
    """Markdown tables of the optimizer-step groups: times, ratios, memory."""
    groups = results.kind_groups("step")
    if not groups:
        return ""
    present = [v for v in STEP_ORDER if any(v in g for _, g in groups)]
    out = []
    rows = []
    for _, g in groups:
        extra = next(iter(g.values())).extra
        cells = [str(extra[c]) for c in ("m", "n", "r", "k", "layers")]
        cells += [_ms(g[v].median_s) if v in g else "—" for v in present]
        paper = g.get("paper_eager")
        cells.append(str(paper.rounds) if paper else "—")
        rows.append(cells)
    impls = sorted({g["adamw_fused"].extra.get("backend", "?") for _, g in groups if "adamw_fused" in g})
    if impls:
        out.append(f"`adamw_fused` ran {', '.join(f'`{i}`' for i in impls)}.\n")
    out.append("Median time of one optimizer step (ms):\n")
    out.append(_table(["m", "n", "r", "k", "layers", *present, "paper_eager rounds"], rows, "r" * (6 + len(present))))

    rows = []
    for _, g in groups:
        extra = next(iter(g.values())).extra
        fused = fused_variant(g)
        floor = floor_seconds(g)
        f = g.get(fused) if fused else None
        paper, eager, adamw = g.get("paper_eager"), g.get("eager"), g.get("adamw_fused")
        rows.append([
            _shape_label(extra), fused or "—",
            _x(ratio(paper, f)), _x(ratio(paper, eager)),
            _x(ratio(f, adamw)), _x(ratio(f, floor)), _x(ratio(eager, floor)), _x(ratio(adamw, floor)),
        ])
    out.append("\nRatios of medians (speed-up = paper_eager ÷ variant; the others = variant ÷ reference):\n")
    out.append(_table(["shape (m×n, r, k, layers)", "fused", "fused speed-up over paper_eager",
                       "eager speed-up over paper_eager", "fused ÷ adamw_fused", "fused ÷ floor", "eager ÷ floor",
                       "adamw_fused ÷ floor"], rows, "ll" + "r" * 6))

    mem_variants = [v for v in present if v != "floor"]
    rows = []
    for _, g in groups:
        extra = next(iter(g.values())).extra
        cells = [_shape_label(extra)]
        cells += [_bytes(g[v].extra.get("peak_bytes")) if v in g else "—" for v in mem_variants]
        paper = g.get("paper_eager")
        anchored = g.get(fused_variant(g) or "")
        cells.append(_bytes(paper.extra.get("resident_bytes")) if paper else "—")
        cells.append(_bytes(anchored.extra.get("resident_bytes")) if anchored else "—")
        floor = g.get("floor")
        cells.append(_bytes(extra["floor_bytes"]))
        bw = floor.extra["copy_bytes"] / floor.median_s / 1e9 if floor and floor.extra.get("copy_bytes") else None
        cells.append("—" if bw is None else f"{bw:.1f}")
        rows.append(cells)
    out.append("\nMemory: peak allocated during one step above what was allocated before it; held between "
               "steps (paper_eager: dense C per layer; anchored: U and the statistics); bytes one step must move; "
               "copy bandwidth measured in the same run (GB/s, read + write):\n")
    out.append(_table(["shape (m×n, r, k, layers)", *[f"peak {v}" for v in mem_variants], "held paper_eager",
                       "held anchored", "floor bytes", "copy GB/s"], rows))
    return "\n".join(out)


def e2e_tables(results: Results) -> str:
    """Markdown table of the end-to-end training-step groups."""
    out = []
    for group, g in results.kind_groups("e2e"):
        base = g.get("adamw")
        extra = next(iter(g.values())).extra
        keys = ("hidden", "layers", "vocab", "batch", "seq", "r", "k")
        desc = ", ".join(f"{k}={extra[k]}" for k in keys if k in extra)
        rows = []
        for v in [v for v in E2E_ORDER if v in g] + sorted(set(g) - set(E2E_ORDER)):
            meas = g[v]
            over = ratio(meas, base)
            rows.append([v, str(meas.extra.get("backend", "")), _ms(meas.median_s), _ms(meas.min_s), str(meas.rounds),
                         _pct(None if over is None or v == "adamw" else over - 1),
                         _pct(meas.extra.get("paired_overhead")), _bytes(meas.extra.get("peak_bytes"))])
        out.append(f"`{group}`: tiny Llama ({desc}), LoRA on q_proj and v_proj; one step = forward + backward "
                   "+ optimizer step + zero_grad. Overhead (medians) compares the two medians; overhead (paired) "
                   "is the median ratio of steps run alternately with a separate AdamW model:\n\n"
                   + _table(["variant", "optimizer", "median ms", "min ms", "rounds", "overhead vs AdamW (medians)",
                             "overhead vs AdamW (paired)", "peak"], rows, "llrrrrrr"))
    return "\n\n".join(out)


def host_tables(results: Results) -> str:
    """Markdown table of the host-work groups: one row per model size, medians and ratios."""
    rows = []
    for _, g in sorted(results.kind_groups("host"), key=lambda item: next(iter(item[1].values())).extra["pairs"]):
        extra = next(iter(g.values())).extra
        fused, foreach = g.get("adamw_fused"), g.get("adamw_foreach")
        cpp, eager = g.get("cpp"), g.get("eager")
        rows.append([str(extra["pairs"]), _ms(fused.median_s if fused else None),
                     _ms(foreach.median_s if foreach else None), _ms(cpp.median_s if cpp else None),
                     _ms(eager.median_s if eager else None), _x(ratio(cpp, fused)), _x(ratio(eager, foreach)),
                     str(cpp.extra.get("ops_per_step", "")) if cpp else "",
                     str(eager.extra.get("ops_per_step", "")) if eager else ""])
    if not rows:
        return ""
    return ("Tiny Llama, all 7 linear layers of every decoder layer adapted (r 8, anchor k 8): shapes small on "
            "purpose, so the step is host work. Ops: torch ops one step dispatches.\n\n"
            + _table(["pairs", "AdamW fused", "AdamW foreach", "cpp", "eager", "cpp / fused", "eager / foreach",
                      "cpp ops", "eager ops"], rows, "rrrrrrrrr"))


def summary_lines(results: Results) -> list[str]:
    """Plain-text headline figures: fused speed-up over paper_eager per shape, e2e overhead."""
    lines = []
    for _, g in results.kind_groups("step"):
        fused = fused_variant(g)
        sp = ratio(g.get("paper_eager"), g.get(fused) if fused else None)
        lines.append(f"{_shape_label(next(iter(g.values())).extra)}: {fused} {_x(sp)} faster than paper_eager")
    for group, g in results.kind_groups("e2e"):
        base = g.get("adamw")
        for v in ("eager", "cpp", "triton", "paper_eager"):
            if v in g and base is not None:
                lines.append(f"{group}: {v} {_pct(ratio(g[v], base) - 1)} (medians), "
                             f"{_pct(g[v].extra.get('paired_overhead'))} (paired) vs AdamW")
    return lines


def render_markdown(results: Results, plot_path: Path | None = None, relative_to: Path | None = None,
                    note: str | None = None, title: str | None = None) -> str:
    """The full markdown text: machine line, note, step tables, plot link, e2e table."""
    parts = []
    if title:
        parts.append(f"# {title}\n")
    parts.append(f"Machine: {machine_line(results)}.")
    if note:
        parts.append(f"\n{note}")
    steps = step_tables(results)
    if steps:
        parts.append("\n## Optimizer step\n")
        parts.append(steps)
    if plot_path is not None:
        link = os.path.relpath(plot_path, relative_to) if relative_to is not None else str(plot_path)
        parts.append(f"\n![median step time vs m per variant]({Path(link).as_posix()})")
    host = host_tables(results)
    if host:
        parts.append("\n## Host work per step\n")
        parts.append(host)
    e2e = e2e_tables(results)
    if e2e:
        parts.append("\n## End-to-end training step\n")
        parts.append(e2e)
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- plot


def plot_steps(results: Results, path: Path) -> bool:
    """Median step time vs m per variant (log-log), one panel per (r, k, layers).

    Returns False (and writes nothing) when the results hold no step groups.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, dict[str, list[tuple[int, float]]]] = {}
    for _, g in results.kind_groups("step"):
        for v, meas in g.items():
            e = meas.extra
            panels.setdefault((e["r"], e["k"], e["layers"]), {}).setdefault(v, []).append((e["m"], meas.median_s))
    if not panels:
        return False
    keys = sorted(panels, key=lambda t: (t[2], t[0], t[1]))
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    markers = dict(zip(STEP_ORDER, "osD^vx"))
    colors = {v: f"C{i}" for i, v in enumerate(STEP_ORDER)}
    for ax, key in zip(axes.flat, keys):
        for v in [v for v in STEP_ORDER if v in panels[key]] + sorted(set(panels[key]) - set(STEP_ORDER)):
            pts = sorted(panels[key][v])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(v, "."), label=v,
                    color=colors.get(v), linestyle="--" if v == "floor" else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"r={key[0]}, k={key[1]}, layers={key[2]}", fontsize=10)
        ax.set_xlabel("m = n")
        ax.set_ylabel("median step time (s)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    legend: dict = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = [v for v in STEP_ORDER if v in legend] + sorted(set(legend) - set(STEP_ORDER))
    handles = [legend[v] for v in labels]
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(f"One optimizer step per variant ({results.machine.get('suite', '')} suite)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- doc

_DOC_PREFACE = """\
This page is generated by `python -m bench.report` from the committed results in
`{results}`; do not edit it by hand. Reproduce with

```bash
pytest bench --benchmark-only --benchmark-json {results}
python -m bench.report {results} --doc docs/performance.md
```

What is measured (see `bench/harness.py`): one optimizer step over anchored LoRA pairs
with `A` (r, n), `B` (m, r), `U` (m, k), fixed task gradients, λ = 1, mode `paper`:

- `paper_eager`: the published training loop: dense `C` (m × m) per layer held between
  steps, `ΔW = B A` materialized, `λ‖(I − C) B A‖²_F` through `asft_kernels.reference`,
  autograd, then `torch.optim.AdamW`;
- `eager`, `cpp`, `triton`: `AsFTAdamW` with that backend (low-rank statistics, nothing
  of size m × n);
- `adamw_fused`: `torch.optim.AdamW(fused=True)` on the same parameters, no anchoring;
- `floor`: a `copy_` moving the bytes one anchored step must move (AdamW traffic of the
  LoRA parameters + one read of every `U`), so `variant ÷ floor` is the distance from the
  memory roofline at the bandwidth measured in the same run.

Times are medians of repeated steps after warm-up (the `paper_eager rounds` column gives
how many timed steps its slow medians rest on); ratios compare medians from the same
run. Rounds run back to back on the same tensors, so caches stay warm and, at CPU sizes,
much of the traffic is served from cache: the floor is a same-run reference, not a strict
bound (a ratio below 1 means a step beat one `copy_` of the same total bytes).
Peak memory is what one step allocates above what was allocated before it
(`torch.profiler` memory events on CPU, `torch.cuda.max_memory_allocated` on GPU).
On a CUDA machine, `bench/gpu_suite.sh` runs the tests and the GPU suite (Llama-2-7B
q/v shapes, 64 layers) and writes the same tables under `$OUT`. One such run, on one
NVIDIA H200, is committed in `bench/results/gpu/` (tables: `bench/results/gpu/gpu.md`;
what it shows and what changed since: docs/triton.md, "Measured on one H200").
"""


def render_doc(results: Results, doc_path: Path, plot_path: Path | None, note: str | None) -> str:
    """The text of ``docs/performance.md``: how to reproduce, what is measured, the tables."""
    rel = Path(os.path.relpath(results.path, Path.cwd())).as_posix()
    body = render_markdown(results, plot_path, relative_to=doc_path.parent, note=note)
    return "# Performance\n\n" + _DOC_PREFACE.format(results=rel) + "\n" + body


# ---------------------------------------------------------------------------- cli


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m bench.report`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+",
                        help="pytest-benchmark JSON written by `pytest bench --benchmark-json` (several: the parts "
                             "of one run, merged into --json)")
    parser.add_argument("--json", type=Path, help="with several results files: the merged results file to write")
    parser.add_argument("--markdown", type=Path, help="markdown tables (default: RESULTS.md beside the JSON)")
    parser.add_argument("--plot", type=Path, help="PNG plot (default: RESULTS.png beside the JSON)")
    parser.add_argument("--doc", type=Path, help="also write the performance page (e.g. docs/performance.md)")
    parser.add_argument("--note", help="a sentence about the run printed under the machine line")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Validate ``RESULTS.json``, then write the markdown, the plot and (``--doc``) the page.

    Raises:
        AsFTError: the results file is missing, unreadable or incomplete (nothing written).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.results) > 1 and args.json is None:
        parser.error("several results files need --json, the merged file to write")
    if args.json is not None:
        # every part is validated before the merged file is written
        results = merge_results(args.results, args.json)
    else:
        results = load_results(args.results[0])  # validates before anything is written
    results_path = results.path
    markdown_path = args.markdown or results_path.with_suffix(".md")
    plot_path = args.plot or results_path.with_suffix(".png")
    wrote_plot = plot_steps(results, plot_path)
    plot = plot_path if wrote_plot else None
    text = render_markdown(results, plot, relative_to=markdown_path.parent, note=args.note,
                           title=f"Benchmark results: {results_path.name}")
    atomic_write(markdown_path, lambda tmp: tmp.write_text(text))
    written = [markdown_path] + ([plot_path] if wrote_plot else [])
    if args.doc:
        doc = render_doc(results, args.doc, plot, args.note)
        atomic_write(args.doc, lambda tmp: tmp.write_text(doc))
        written.append(args.doc)
    for line in summary_lines(results):
        print(line)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AsFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
