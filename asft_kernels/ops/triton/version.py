"""The Triton releases the backend supports, and the check made when it is imported.

The range is the one ``pyproject.toml`` declares (``triton>=3.6,<3.10``): the oldest and
the newest release in it are the ones the kernels are compiled (``tests/test_triton_aot.py``)
and interpreted (``tests/test_triton.py``) against in CI. Another release imports the
backend with one :class:`TritonVersionWarning` and leaves it unavailable, so
``backend="auto"`` runs the eager backend instead of failing inside a kernel.
"""

from __future__ import annotations

import re

#: Oldest supported Triton release (major, minor), inclusive.
MIN_TRITON = (3, 6)
#: First Triton release (major, minor) not supported.
MAX_TRITON_EXCLUSIVE = (3, 10)
#: The requirement string of ``pyproject.toml``.
TRITON_REQUIREMENT = f"triton>={MIN_TRITON[0]}.{MIN_TRITON[1]},<{MAX_TRITON_EXCLUSIVE[0]}.{MAX_TRITON_EXCLUSIVE[1]}"


class TritonVersionWarning(UserWarning):
    """The installed Triton is outside the supported range; the eager backend runs instead."""


def version_problem(version: str) -> str | None:
    """None when Triton ``version`` (e.g. ``"3.6.0"``, ``"3.9.0+git1234"``) is supported,
    else the message that says so and what runs instead."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is not None and MIN_TRITON <= (int(found[1]), int(found[2])) < MAX_TRITON_EXCLUSIVE:
        return None
    return (f"asft_kernels: Triton {version} is not supported by the triton backend (supported: "
            f"{TRITON_REQUIREMENT}); the backend is unavailable and CUDA tensors use the eager backend. "
            f"Install a supported release: pip install '{TRITON_REQUIREMENT}'")
