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
# peft's PeftModel() (every LoRA model the train, merge and evaluate stages build) reads the model's
# `is_gradient_checkpointing`, which transformers 5.24 renamed and warns about; no argument of ours avoids peft's read
# (expqa itself calls the new names: model.loading.enable_checkpointing, training.trainer.checkpointing_argument).
# Only that message, only from transformers.modeling_utils: any other FutureWarning still shows.
IS_GRADIENT_CHECKPOINTING = "`is_gradient_checkpointing` is deprecated"
# The Trainer logs this at the end of every train(), at INFO, which the train stage turns on for transformers.trainer
# (its lines go to logs/train/training.log); expqa keeps adapters local, there is nothing to share.
TRAINER_LOGGER = "transformers.trainer"
SHARE_YOUR_MODEL = "\n\nTraining completed. Do not forget to share your model"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _drop(logger_name: str, prefix: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_DropMessage(prefix))


def install() -> None:
    """Silence the messages above; every other warning and log record still shows."""
    _drop(BNB_CPU_KERNEL_LOGGER, BNB_CPU_KERNEL_MESSAGE)
    _drop(TRAINER_LOGGER, SHARE_YOUR_MODEL)
    warnings.filterwarnings("ignore", message=re.escape(LIGER_DEPRECATION), category=FutureWarning)
    warnings.filterwarnings(
        "ignore",
        message=re.escape(IS_GRADIENT_CHECKPOINTING),
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )
