"""expqa: reproducible QLoRA fine-tuning for experimentation and statistics Q&A."""

from expqa import noise

__version__ = "0.1.0"

noise.install()  # before any stage imports bitsandbytes or TRL
