"""Serving: putting the trained model to use. The commands `expqa ask`, `chat` and `serve` (ask.py, chat.py,
serve.py), `expqa llama-serve` (llama_server.py: llama.cpp's server on a GGUF file, e.g. the generate stage's teacher)
and the export stage's GGUF files and Ollama Modelfile (export.py, ollama.py) share one inference module
(inference.py: which model to load, the prompt of a question, greedy batched and streamed generation); a command
imports inference.py, never another command. May import expqa.config, files, progress, wording, data.dataset and
model; never training.
"""
