"""Models: materialising the base model (base.py, with gguf_tokenizer.py for the embedded GGUF), loading it for
training or inference (loading.py) with the training-time pieces it wires in (fused_lora.py, fp8.py, attention.py,
lm_head.py, checkpointing.py), merging an adapter into it (merge.py), and telling whether two models are the same
(equivalence.py: the logits and greedy checks of merge and export). May import expqa.config, files, progress and
data.dataset (the chat template); never training, evaluation or serving.
"""
