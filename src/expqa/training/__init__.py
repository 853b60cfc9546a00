"""Training: the train stage's QLoRATrainer (trainer.py: setup, train, save), the TrainerCallbacks it installs
(callbacks.py: dvclive metrics, numeric log lines, stop on a signal, fingerprinted checkpoints), resuming a killed
run (resume.py: checkpoint fingerprints, code_fingerprint), and multi-process runs (distributed.py: DDP/FSDP, the
torchrun relaunch).
May import expqa.config, files, wording, data and model; only the pipeline (and benchmarks) import it.
"""
