"""Evaluation: the evaluate stage's base-vs-tuned report (evaluate.py: perplexity, ROUGE, stop rate, critical
questions), its intervals and paired tests (significance.py), and `expqa plots` (plots.py). May import expqa.config,
files, progress, wording, data, model.loading and serving.inference (batched greedy generation); never training.
"""
