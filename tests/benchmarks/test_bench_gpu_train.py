"""The GPU benchmark's pieces that run before any GPU does: the suite's variant names, Unsloth's batching setups and
the tables (benchmarks/gpu_train.py). The whole driver is exercised on CPU by
`python benchmarks/gpu_train.py --suite issue21 --dry-run` (minutes; not part of the test suite)."""

import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_train
import unsloth_recipe


def test_every_suite_row_names_a_known_variant():
    known = set(gpu_train.VARIANTS) | set(gpu_train.SPECIAL)
    for name, rows in gpu_train.SUITES.items():
        assert rows, name
        for arch, variant, seconds in rows:
            assert arch in gpu_train.ARCHS and variant in known and seconds > 0, (name, arch, variant)
    first = [variant for _, variant, _ in gpu_train.SUITES["issue21"][:4]]
    assert first == ["params", "unsloth", "plain", "params_gcfull"]  # the comparisons come first


def test_unsloth_batching_setups():
    packed, padding_free = unsloth_recipe.recipes("unsloth", 16384, 470.0)
    assert packed[1]["packing"] and packed[1]["max_length"] == 16384 and packed[1]["per_device_train_batch_size"] == 1
    assert padding_free[1]["padding_free"] and padding_free[1]["per_device_train_batch_size"] == 34
    (notebook,) = unsloth_recipe.recipes("unsloth_notebook", 16384, 470.0)
    assert notebook[1]["per_device_train_batch_size"] == 2 and notebook[1]["gradient_accumulation_steps"] == 4


def test_tables_give_ratios_within_an_architecture(tmp_path):
    base = dict(
        fused_lora=True,
        grouped_lora=True,  # recorded from the run plan
        tokens_per_micro_batch=16384,
        micro_batch=16,
        grad_accum=1,
        lora_dropout=0.0,
        optim="adamw_torch_fused",
        mfu_vs_790T=0.5,
        peak_alloc_gib=45.0,
        peak_reserved_gib=50.0,
        last_loss=10.7,
        device="NVIDIA H200",
    )
    results = [
        {
            "variant": "expqa:params",
            "arch": "llama-3.2-3b",
            "tok_per_s": 36000,
            "gradient_checkpointing": "off",
            "gradient_checkpointing_requested": "auto",
            "checkpointed_layers": "0/28",
            **base,
        },
        {
            "variant": "unsloth",
            "arch": "llama-3.2-3b",
            "tok_per_s": 18000,
            "recipe": "Unsloth: packed",
            "mfu_vs_790T": 0.4,
            "peak_alloc_gib": 9.0,
            "peak_reserved_gib": 12.0,
            "last_loss": 10.8,
        },
        {
            "variant": "plain:real_pad",
            "arch": "llama-3.2-3b",
            "tok_per_s": 1200,
            "mfu_vs_790T": 0.03,
            "peak_alloc_gib": 10.4,
            "peak_reserved_gib": 21.3,
            "last_loss": 12.3,
        },
        {
            "variant": "expqa:params",
            "arch": "llama-3.1-8b",
            "tok_per_s": 13000,
            "gradient_checkpointing": "selective",
            "gradient_checkpointing_requested": "auto",
            "checkpointed_layers": "5/32",
            **base,
        },
        {"variant": "unsloth", "arch": "llama-3.1-8b", "error": "exit 1: RuntimeError: every setup failed"},
        {"variant": "plain", "arch": "llama-3.1-8b", "skipped": "skipped: 500 s used + ~80 s expected > 520 s"},
        {
            "variant": "expqa:probe",
            "arch": "llama-3.2-3b",
            "longest_trained": 131072,
            "first_oom": None,
            "stopped_by": "the model's context (max_position_embeddings)",
            "memory_bound_estimate": 400000,
            "peak_alloc_gib": 41.0,
            "trials": [{"tokens": 131072, "ok": True, "seconds": 25.0, "peak_alloc_gib": 41.0}],
        },
    ]
    text = gpu_train.write_tables(tmp_path, "stamp", results, ["a note"])
    rows = {
        line.split(" | ")[1] + "@" + line.split(" | ")[0].strip("| "): line
        for line in text.splitlines()
        if line.startswith("| llama")
    }
    assert "| 36,000 | 2.00 | 30.00 |" in rows["expqa:params@llama-3.2-3b"]
    assert "GC auto -> off" in rows["expqa:params@llama-3.2-3b"]
    assert "GC auto -> selective (5/32 layers)" in rows["expqa:params@llama-3.1-8b"]
    assert "every setup failed" in rows["unsloth@llama-3.1-8b"] and "skipped" in rows["plain@llama-3.1-8b"]
    assert "| llama-3.2-3b | 131,072 tokens | the model's context" in text and "~400,000 tokens" in text
    assert (tmp_path / "gpu_train_stamp.json").exists() and "- a note" in text
    short = gpu_train.short_table(results)
    assert "longest 131,072" in short and "36,000" in short and "every setup failed" in short
