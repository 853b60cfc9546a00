"""Serving: putting the trained model to use. The commands `expqa ask`, `chat` and `serve` (ask.py, chat.py,
serve.py) and the export stage's GGUF files and Ollama Modelfile (export.py, ollama.py) share one inference module
(inference.py: which model to load, the prompt of a question, greedy batched and streamed generation); a command
imports inference.py, never another command. May import expqa.config, files, progress, wording, data.dataset and
model; never training.
"""
