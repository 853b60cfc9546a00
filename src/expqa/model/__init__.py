"""Models: materialising the base model (base.py, with gguf_tokenizer.py for the embedded GGUF), loading it for
training or inference (loading.py) with the training-time pieces it wires in (fused_lora.py, fp8.py, attention.py,
lm_head.py, checkpointing.py), and merging an adapter into it, verified (merge.py: its logits and greedy checks are
export's too). May import expqa.config, files, progress and data.dataset (the chat template); never training,
evaluation or serving.
"""
