"""Where the time of one triton ``AsFTAdamW.step()`` goes on a CUDA device.

For each GPU-suite step shape picked by ``--shapes``: the host time of a step (median, with
``torch.cuda.synchronize()``), the device time of its kernels (``torch.profiler``, summed
per kernel name over ``--steps`` steps, divided by ``--steps``), and the copy floor of the
same bytes (``copy_``, CUDA events). Prints one table per shape::

    python bench/triton_profile.py --shapes r8-k64 r64-k256 --steps 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import _GPU_SHAPES, build_step_case, random_anchor  # noqa: E402
from bench.host_overhead import median_step_ms  # noqa: E402


def _shape(name: str):
    for shape in _GPU_SHAPES:
        if f"-{name}-" in shape.group + "-":
            return shape
    raise SystemExit(f"no GPU-suite shape matches {name!r}; shapes: {[s.group for s in _GPU_SHAPES]}")


def profile(name: str, steps: int) -> None:
    shape = _shape(name)
    device = torch.device("cuda")
    anchor = random_anchor(shape)
    print(f"\n## {shape.group} ({steps} steps)")
    for variant in ("triton", "adamw_fused", "floor"):
        case = build_step_case(variant, shape, device, torch.float32, anchor=anchor)
        host = median_step_ms(case.step, device, steps, warmup=3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                case.step()
            torch.cuda.synchronize()
        kernels = [(e.key, e.device_time_total / steps / 1e3, e.count / steps) for e in prof.key_averages()
                   if e.device_time_total > 0]
        kernels.sort(key=lambda item: -item[1])
        total = sum(ms for _, ms, _ in kernels)
        print(f"{variant}: host-timed step {host:.3f} ms, device time of its kernels {total:.3f} ms")
        for key, ms, count in kernels[:8]:
            print(f"    {ms:8.3f} ms  x{count:g}  {key[:90]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["r8-k64"], help="e.g. r8-k64 r64-k4096")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_profile.py: needs a CUDA device", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.shapes:
        profile(name, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
