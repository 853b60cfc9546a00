"""expqa: reproducible QLoRA fine-tuning for experimentation and statistics Q&A."""

__version__ = "0.1.0"
