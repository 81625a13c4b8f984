"""Notices of third-party packages that say nothing to a user of asft_kernels, silenced
when the package is imported (so in every process that imports it: the ``asft`` command,
the demo's worker processes, a training script).

bitsandbytes, which peft imports where it is installed, logs a warning at import on CPUs
with AVX512-BF16 when the optional ``kernels`` package's 4-bit CPU matmul cannot be
loaded; bitsandbytes' own CPU code runs instead. Only that logger is raised to ERROR:
its errors still show. A script that imports peft before asft_kernels sees the notice.
"""

from __future__ import annotations

import logging

#: loggers of other packages raised to ERROR at import
QUIETED_LOGGERS = ("bitsandbytes.backends.cpu.ops",)

for _name in QUIETED_LOGGERS:
    logging.getLogger(_name).setLevel(logging.ERROR)
