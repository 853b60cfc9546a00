"""Library messages that are noise for expqa's users, silenced one by one (never whole categories).

Each entry says why it is noise. Installed by ``import expqa``, so it is in place before bitsandbytes or TRL is
imported by any stage.
"""

from __future__ import annotations

import logging
import re
import warnings

# bitsandbytes logs this on import on CPUs with avx512_bf16 when the optional `kernels` package (a Hub download) is
# missing; it then uses its own CPU kernel, which expqa's CPU profile runs on anyway.
BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_CPU_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
# TRL announces the removal of use_liger_kernel in its v2; expqa pins TRL below that and uses Liger on purpose
# (train.use_liger_kernel in params.yaml), so the user can do nothing about it.
LIGER_DEPRECATION = "`use_liger_kernel=True` is deprecated"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Silence the messages above; every other warning and log record still shows."""
    logger = logging.getLogger(BNB_CPU_KERNEL_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(BNB_CPU_KERNEL_MESSAGE))
    warnings.filterwarnings("ignore", message=re.escape(LIGER_DEPRECATION), category=FutureWarning)
