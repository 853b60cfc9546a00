"""benchmarks/fsdp_check.py's report: the table and notes render for a complete GPU record and for failed phases
(the script itself ran end to end on CPU with a tiny model; on the GPU it has one chance)."""

import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import fsdp_check


def run(mode, fsdp, tok_per_s, peak, losses):
    return {
        "mode": mode,
        "world_size": 1,
        "steps": 20,
        "fsdp": fsdp,
        "device": "NVIDIA H200",
        "tok_per_s": tok_per_s,
        "timed_steps": "6-20",
        "peak_alloc_gib": peak,
        "peak_reserved_gib": peak + 1.5,
        "weights_held_mib": 2250.3,
        "weights_total_mib": 2250.3,
        "eval_loss_before": 11.93,
        "eval_loss_after": 10.5,
        "losses": losses,
        "wall_s": 61.0,
    }


def test_complete_gpu_record():
    record = {
        "date": "2026-11-29 14:00",
        "device": "NVIDIA H200",
        "errors": {},
        "runs": {
            "fsdp": {
                **run("fsdp", True, 17000, 10.2, [11.9, 11.0]),
                "linear4bit_fully_shard": {
                    "packed_values_that_are_bf16_nan": 6100,
                    "max_abs_diff": 0.0,
                    "identical": True,
                },
            },
            "single": run("single", False, 18300, 9.1, [11.9, 11.01]),
        },
        "merge": {
            "passed": True,
            "device": "cuda",
            "saved_dtype": "bfloat16",
            "max_abs_logit_diff": 0.04,
            "tolerance": 0.5,
            "wall_s": 50.2,
        },
    }
    record["notes"] = fsdp_check.notes(record)
    text = fsdp_check.table(record)
    assert "| fsdp | torchrun --nproc_per_node=1 | yes | 17,000 (6-20) | 10.2 | 11.7 |" in text
    assert "| single | python, 1 process (ddp path) | no | 18,300 (6-20) | 9.1 |" in text
    assert "fsdp / single speed: 0.93x" in text and "(identical)" in text and "passed=True" in text
    assert "max |fsdp - single| over 2 logged steps: 0.0100" in text


def test_failed_and_skipped_phases():
    record = {
        "date": "d",
        "device": "cuda",
        "runs": {},
        "merge": None,
        "errors": {"fsdp": "exit timeout: step 3", "merge": "skipped: no FSDP adapter"},
    }
    record["notes"] = fsdp_check.notes(record)
    text = fsdp_check.table(record)
    assert "| fsdp | torchrun --nproc_per_node=1 | error: exit timeout: step 3 |" in text
    assert "| single | python, 1 process (ddp path) | not run |" in text
    assert "merge failed: skipped: no FSDP adapter" in text
