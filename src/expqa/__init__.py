"""expqa: reproducible QLoRA fine-tuning for experimentation and statistics Q&A.

Packages: config (params), data (raw inputs to tokens), model (base model, loading, merge), training, evaluation,
serving (inference and the commands that answer), workspace (the checkout), pipeline (dvc.yaml's stages as
functions). The modules here (cli, files, progress, noise, wording) are shared utilities: they import no package but
cli, which dispatches to them all.
"""

from expqa import noise

__version__ = "0.1.0"

noise.install()  # before any stage imports bitsandbytes or TRL
