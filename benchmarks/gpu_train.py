"""GPU benchmark: the project's `train` code path vs the plain HF recipe and Unsloth, same checkpoint, same lengths.

    python3 benchmarks/gpu_train.py [--arch llama-3.1-8b] VARIANT ...          (on a CUDA machine)
    python3 benchmarks/gpu_train.py --suite issue21 --results $OUT \\
        --wheels .gpu/bench/whl --unsloth-wheels .gpu/bench/whl-unsloth --tokenizer .gpu/bench/tokenizer
    python3 benchmarks/gpu_train.py --suite issue21 --dry-run ...              (CPU: the whole control flow, tiny model)
    BENCH_PROFILE=params python3 benchmarks/gpu_train.py plain params          (+ a kernel table of `params`)

Builds the exact Llama-3.2-3B (or --arch llama-3.1-8b) config with random bf16 weights (benchmarks/common.py;
throughput and memory do not depend on values) with the embedded ChatML tokenizer, writes conversations whose token
lengths follow the plain recipe's realistic distribution (lognormal, median 450, clipped 64..2048, same seed), and
trains through `QLoRATrainer` with params.yaml's GPU profile ("params") or that profile with the overrides of a
VARIANTS entry. Other variants: "plain" (`plain_recipe_baseline.py real_pad`: the seed's recipe, padded), "unsloth"
(`unsloth_recipe.py`: Unsloth's own QLoRA recipe, packed to the same token budget), "unsloth_notebook" (Unsloth's
notebook batch: 2 conversations x 4, padding-free), "probe" (the longest single conversation that trains, lean
setting). Each variant runs in its own process (peak memory is its own), counted the same way: non-padding tokens
per second over the same timed steps after the same warm-up. Tables are rewritten after every variant, so a run cut
short keeps what it measured.

--suite runs a list of (architecture, variant) within --budget seconds (SUITES: issue21, or issue21-3b and
issue21-8b for two calls; most important first; what does not fit is skipped and listed), after installing the
carried wheels: --wheels into one --target folder for the project's variants, --unsloth-wheels into another for
Unsloth (it pins older trl/datasets than ours), each child seeing only its own folder on PYTHONPATH. The host's
`pip freeze`, each site's `pip check` and every child's log are written next to the tables. --dry-run does all of it
on CPU with tiny random models of the same layout (to test the driver before a GPU call): same processes, same
installs, same tables; only the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common
from common import (
    DRY_STEPS,
    HERE,
    PEAK_FLOPS,
    REPO,
    STEPS,
    device_name,
    emit,
    last_loss,
    make_data,
    make_random_llama,
    memory_peaks,
    param_count,
    reset_memory,
    shipped_params,
    step_timer,
    steps,
    sync,
)

RESULTS = Path(os.environ.get("BENCH_RESULTS", HERE / "results"))
ARCHS = ("llama-3.2-3b", "llama-3.1-8b")
PLAIN_STEPS = {"llama-3.2-3b": (2, 4), "llama-3.1-8b": (1, 3)}  # ~1k tok/s: a step takes 3-8 s
# the dry run's stand-ins: the same layout (GQA, tied or not), tiny
DRY_SHAPES = {
    "llama-3.2-3b": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=49152,
    ),
    "llama-3.1-8b": dict(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=49152,
    ),
}
# variant -> overrides of params.yaml's train section (lora_dropout: of the lora section); "params" = as shipped,
# "params_X" = the shipped profile with one thing changed, "seedbatch16" = the default of 2026-11. Rows in results/
# record every option they ran with, so older tables stay readable after the variant names change.
VARIANTS = {
    "params": {},
    "params_gcfull": dict(gradient_checkpointing="full"),  # the memory-lean one-key switch
    "params_gcsel": dict(gradient_checkpointing="selective"),
    "params_nogc": dict(gradient_checkpointing="off"),
    "params_nofp8": dict(fp8_matmul="off"),  # the base matmuls in bf16 (the default before FP8, 2026-11-29)
    "params_nogroup": dict(fused_lora="per_projection"),  # the fused LoRA function per projection (2026-11)
    "params_gcfull_tok8k": dict(gradient_checkpointing="full", micro_batch="8192 tokens"),  # leaner still
    "params_offload": dict(gradient_checkpointing="offload"),  # full, layer inputs in host memory
    "seedbatch16": dict(
        micro_batch="16 conversations",
        fused_lora="off",
        lora_dropout=0.05,
        optim="paged_adamw_8bit",
        gradient_checkpointing="full",
    ),
    "params_dropout005": dict(lora_dropout=0.05),
    "params_peft": dict(fused_lora="off"),
    "params_paged": dict(optim="paged_adamw_8bit"),
    "params_adamw8bit": dict(optim="adamw_8bit"),
    **{f"params_tok{k}k": dict(micro_batch=f"{k * 1024} tokens") for k in (8, 12, 24, 32)},
}
SPECIAL = ("plain", "unsloth", "unsloth_notebook", "probe")
# suites: (architecture, variant, expected seconds on an H200 incl. start-up), most important first: a variant that
# would pass --budget is skipped (and listed), the next smaller ones may still run
B3, B8 = ARCHS
SUITES = {
    "issue21": [
        (B3, "params", 45),
        (B3, "unsloth", 150),
        (B3, "plain", 45),
        (B3, "params_gcfull", 40),
        (B8, "params", 75),
        (B3, "probe", 100),
        (B8, "unsloth", 180),
        (B8, "probe", 150),
        (B8, "plain", 80),
        (B3, "params_nogroup", 40),
        (B3, "params_nogc", 40),
        (B3, "unsloth_notebook", 120),
        (B3, "params_gcfull_tok8k", 40),
        (B3, "params_gcsel", 40),
        (B3, "params_tok32k", 45),
    ],
}
SUITES["smoke"] = [(B3, "params", 45), (B8, "params", 75)]  # the driver's whole path, quickly
# the lean setting (offload) against Unsloth's memory, and larger token budgets for the default's speed
SUITES["issue21-lean"] = [
    (B3, "params_offload", 45),
    (B3, "unsloth", 150),
    (B3, "params", 45),
    (B3, "params_gcfull", 40),
    (B3, "params_tok32k", 50),
    (B3, "params_tok24k", 45),
    (B8, "params_offload", 90),
]
# the final tables of round two, with FP8 (one call per architecture: a call may run 600 s)
SUITES["issue21-final-3b"] = [
    (B3, "params", 45),
    (B3, "unsloth", 150),
    (B3, "params_nofp8", 45),
    (B3, "plain", 45),
    (B3, "params_offload", 45),
    (B3, "params_gcfull", 40),
    (B3, "params_tok24k", 45),
]
SUITES["issue21-final-8b"] = [
    (B3, "params_offload", 45),  # after `auto` left FP8 off under offload
    (B8, "params", 75),
    (B8, "params_nofp8", 75),
    (B3, "params", 45),
    (B8, "params_offload", 90),
    (B8, "plain", 80),
]  # Unsloth's 8B row (180 s) did not fit the session's last GPU minutes: round two measured it (7,589 tokens/s)
# the same in two calls
SUITES["issue21-3b"] = [row for row in SUITES["issue21"] if row[0] == B3]
SUITES["issue21-8b"] = [row for row in SUITES["issue21"] if row[0] == B8]
CHECKPOINT_SECONDS = {"llama-3.2-3b": 25, "llama-3.1-8b": 60}  # random weights written once per call


# ---------------------------------------------------------------------------------------------------------------
# shared by the child processes (imports inside: the driver runs on the standard library alone)


# ---------------------------------------------------------------------------------------------------------------
# the project's variants


def run_project(name: str, arch: str, base: Path, data: Path) -> dict:
    import torch
    from transformers import TrainerCallback

    from expqa.training.trainer import QLoRATrainer

    params = shipped_params()
    overrides = dict(VARIANTS[name])
    if common.DRY and overrides.get("micro_batch", "").endswith(" tokens"):
        overrides["micro_batch"] = f"{params.train.tokens_per_micro_batch * 2} tokens"
    lora = dataclasses.replace(params.lora, dropout=overrides.pop("lora_dropout", params.lora.dropout))
    warm, timed = steps(arch)
    profile = name in os.environ.get("BENCH_PROFILE", "").split(",") and torch.cuda.is_available()
    train = dataclasses.replace(
        params.train,
        max_steps=warm + timed + (2 if profile else 0),
        save_steps=10_000,
        logging_steps=warm + timed,
        **overrides,
    )  # logs (and syncs) like a real run
    runner = QLoRATrainer(
        train,
        lora=lora,
        quantization=params.quantization,
        seed=params.base.seed,
        base_model=base,
        data_dir=data,
        checkpoint_dir=common.WORK / f"ckpt_{arch}_{name}",
        metrics_dir=None,
        log_dir=None,
    )
    reset_memory()
    runner.setup()
    runner.trainer.eval_dataset = None  # the bench data has no val split; nothing to evaluate
    timer = step_timer(warm, timed, lambda: runner.trainer.real_tokens)
    runner.trainer.add_callback(timer)
    if profile:
        table = RESULTS / f"gpu_profile_{arch}_{name}_{time.strftime('%Y-%m-%d')}.txt"
        runner.trainer.add_callback(profiler_callback(TrainerCallback, warm + timed, table))
    runner.trainer.train()
    tok_s = timer.tokens / timer.elapsed
    c, plan = runner.config, runner.plan
    choice = plan.checkpointing
    recomputed = len(choice.checkpointed_layers) / choice.layers
    flops_per_token = (4 + 2 * recomputed) * param_count(runner.trainer.model.config)
    return {
        "variant": f"expqa:{name}",
        "arch": arch,
        "micro_batch": c.per_device_train_batch_size,
        "tokens_per_micro_batch": c.tokens_per_micro_batch,
        "fused_lora": plan.fused_lora,
        "grouped_lora": plan.grouped_lora,
        "fp8_matmul": "on" if plan.fp8 else "off",
        "fp8_weight_cache": plan.fp8_cache,
        "optim": c.optim,
        "grad_accum": c.gradient_accumulation_steps,
        "padding_free": plan.padding_free,
        "gradient_checkpointing": choice.mode,
        "gradient_checkpointing_requested": c.gradient_checkpointing,
        "checkpointed_layers": f"{len(choice.checkpointed_layers)}/{choice.layers}",
        "gc_estimate_gib": choice.estimate_gib,
        "gc_available_gib": choice.available_gib,
        "lora_dropout": lora.dropout,
        "attn": plan.attention,
        "liger": c.use_liger_kernel,
        "warm_steps": warm,
        "timed_steps": timed,
        "timed_tokens": timer.tokens,
        "tok_per_s": round(tok_s),
        "mfu_vs_790T": round(tok_s * flops_per_token / PEAK_FLOPS, 3),
        **memory_peaks(),
        "last_loss": last_loss(runner.trainer),
    }


def profiler_callback(base_class, after_step: int, path: Path):
    """torch.profiler over two optimizer steps after the timed ones; writes the kernel table (BENCH_PROFILE=...)."""
    import torch

    class Profile(base_class):
        prof = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == after_step:
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
            elif state.global_step == after_step + 2 and self.prof is not None:
                sync()
                self.prof.__exit__(None, None, None)
                table = self.prof.key_averages().table(
                    sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70
                )
                path.write_text(table)
                print(table, flush=True)
                self.prof = None

    return Profile()


def run_plain(arch: str, base: Path) -> dict:
    sys.path.insert(0, str(HERE))
    import plain_recipe_baseline as plain

    plain.CKPT, plain.OUT = str(base), str(common.WORK / f"plain_{arch}")
    plain.WARM, plain.TIMED = DRY_STEPS if common.DRY else PLAIN_STEPS[arch]
    if common.DRY:  # short rows and token ids the tiny vocabulary has
        lengths, dataset = plain.real_lengths, plain.DS
        plain.real_lengths = lambda n, seed=1: [max(8, x // 8) for x in lengths(n, seed)]

        class SmallVocab(dataset):
            def __init__(self, n, seqlen, lengths=None):
                super().__init__(n, seqlen, lengths)
                self.items = [ids % 49152 for ids in self.items]

        plain.DS = SmallVocab
    from transformers import AutoConfig

    plain.N_PARAMS = param_count(AutoConfig.from_pretrained(base))
    plain.run("real_pad")
    row = json.loads((Path(plain.OUT) / "results.jsonl").read_text().splitlines()[-1])
    return {
        "variant": "plain:real_pad",
        "arch": arch,
        "warm_steps": plain.WARM,
        "timed_steps": plain.TIMED,
        **{k: row[k] for k in ("tok_per_s", "mfu_vs_790T", "peak_alloc_gib", "peak_reserved_gib", "last_loss")},
    }


# ---------------------------------------------------------------------------------------------------------------
# the longest single conversation that trains (lean setting: every layer checkpointed)


def run_probe(arch: str, base: Path) -> dict:
    import gc

    import torch
    from transformers import AutoConfig

    from expqa.model import checkpointing
    from expqa.model.loading import load_for_training
    from expqa.training.plan import machine_facts, plan_run

    params = shipped_params()
    c = dataclasses.replace(params.train, gradient_checkpointing="full")
    plan = plan_run(c, params.lora, params.quantization, AutoConfig.from_pretrained(base), machine_facts())
    model, _ = load_for_training(base, params.quantization, params.lora, plan)
    checkpointing.apply(model, plan.checkpointing)
    if c.use_liger_kernel:  # as the Trainer applies it (fused linear cross-entropy: no full logits)
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model.get_base_model())
    model.train()
    cuda = torch.cuda.is_available()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=cuda)
    device = next(p.device for p in trainable)
    context = model.config.max_position_embeddings
    seconds = float(os.environ.get("BENCH_PROBE_SECONDS", 90))
    fake_oom = int(os.environ.get("BENCH_FAKE_OOM_TOKENS", 0))  # dry run: pretend memory ends here
    start = 1024 if common.DRY else 16384
    cap = min(context, 8192) if common.DRY else context
    trials, started = [], time.time()

    def attempt(length: int) -> dict:
        reset_memory()
        t0 = time.time()
        ok, error = True, None
        try:
            if fake_oom and length > fake_oom:
                raise torch.OutOfMemoryError(f"(dry run) {length} > BENCH_FAKE_OOM_TOKENS")
            ids = torch.randint(0, 49152, (1, length), device=device)
            positions = torch.arange(length, device=device).unsqueeze(0)
            loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
            loss.backward()
            optimizer.step()
            sync()
            del ids, positions, loss
        except torch.OutOfMemoryError as exc:
            ok, error = False, str(exc).splitlines()[0][:160]
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        trial = {"tokens": length, "ok": ok, "seconds": round(time.time() - t0, 2), **memory_peaks()}
        if error:
            trial["error"] = error
        print(f"probe {arch}: {trial}", flush=True)
        trials.append(trial)
        return trial

    def predicted_seconds(length: int) -> float:
        done = [t for t in trials if t["ok"]][-2:]
        if len(done) < 2:
            return 0.0
        (l1, t1), (l2, t2) = [(t["tokens"], t["seconds"]) for t in done]
        # t = a L + b L^2 through both points (attention grows with L^2)
        b = max((t2 / l2 - t1 / l1) / (l2 - l1), 0.0)
        return (t1 / l1 - b * l1) * length + b * length**2

    def affordable(length: int) -> bool:
        return time.time() - started + predicted_seconds(length) <= seconds

    length, low, high = start, 0, None
    while length <= cap and affordable(length):
        if attempt(length)["ok"]:
            low = length
            length = cap if length < cap < 2 * length else 2 * length
        else:
            high = length
            break
    while high is not None and high - low > max(256, low // 8):  # bisect between the last fit and the first OOM
        middle = (low + high) // 2 // 256 * 256
        if not affordable(middle):
            break
        if attempt(middle)["ok"]:
            low = middle
        else:
            high = middle
    fits = [t for t in trials if t["ok"]]
    estimate = None
    if len(fits) >= 2 and cuda:  # memory grows ~linearly with length: where would it end (97 % of the card)?
        (l1, m1), (l2, m2) = [(t["tokens"], t["peak_alloc_gib"]) for t in fits[-2:]]
        total = torch.cuda.get_device_properties(0).total_memory / 2**30 * 0.97
        if m2 > m1:
            estimate = int(l2 + (total - m2) * (l2 - l1) / (m2 - m1))
    why = (
        "out of memory above"
        if high is not None
        else "the model's context (max_position_embeddings)"
        if low >= cap
        else "the time cap"
    )
    return {
        "variant": "expqa:probe",
        "arch": arch,
        "gradient_checkpointing": "full",
        "longest_trained": low,
        "first_oom": high,
        "stopped_by": why,
        "memory_bound_estimate": estimate,
        "context": context,
        "probe_seconds": seconds,
        "trials": trials,
        "peak_alloc_gib": max((t["peak_alloc_gib"] for t in fits), default=None),
    }


# ---------------------------------------------------------------------------------------------------------------
# one variant in this process


def make_base(arch: str, tokenizer_dir: Path) -> Path:
    """Random weights of `arch` with the embedded tokenizer/chat template (ids < 49152 fit the 128k vocabulary)."""
    out = common.WORK / f"{arch}-random{'-dry' if common.DRY else ''}"
    if (out / "base_info.json").exists():  # written last: a checkpoint cut short is made again
        return out
    make_random_llama(arch, tokenizer_dir, out, **(DRY_SHAPES[arch] if common.DRY else {}))
    return out


def run_one(name: str, arch: str, base: Path, data: Path) -> None:
    started = time.time()
    if name == "plain":
        result = run_plain(arch, base)
    elif name.startswith("unsloth"):
        from unsloth_recipe import run_unsloth  # its own site folder: see main()

        result = run_unsloth(name, arch, base, data)
    elif name == "probe":
        result = run_probe(arch, base)
    else:
        result = run_project(name, arch, base, data)
    result.update(device=device_name(), process_seconds=round(time.time() - started, 1))
    emit(result)


# ---------------------------------------------------------------------------------------------------------------
# tables


def shape_of(r: dict) -> str:
    if r["variant"].startswith("plain"):
        return "2 conv x 4 padded, PEFT LoRA, dropout 0.05, paged_adamw_8bit, SDPA, full GC"
    if r["variant"].startswith("unsloth"):
        return r.get("recipe", "")
    if r["variant"] == "expqa:probe":
        return "one conversation, lean (full GC)"
    batch = f"{r['tokens_per_micro_batch']:,} tokens" if r.get("tokens_per_micro_batch") else f"{r['micro_batch']} conv"
    lora = ("grouped fused" if r.get("grouped_lora") else "fused") if r["fused_lora"] else "PEFT"
    gc = r["gradient_checkpointing"] + (
        f" ({r['checkpointed_layers']} layers)" if r["gradient_checkpointing"] == "selective" else ""
    )
    if r.get("gradient_checkpointing_requested") == "auto":
        gc = f"auto -> {gc}"
    fp8 = ", FP8 base matmuls" if r.get("fp8_matmul") == "on" else ""
    return f"{batch} x {r['grad_accum']}, {lora} LoRA, dropout {r['lora_dropout']}, {r['optim']}, GC {gc}{fp8}"


def ratio(value, reference) -> str:
    return f"{value / reference:.2f}" if value and reference else ""


def write_tables(out_dir: Path, stamp: str, results: list[dict], notes: list[str]) -> str:
    devices = sorted({r.get("device", "") for r in results if r.get("device")})
    record = {"date": stamp, "device": ", ".join(devices), "results": results, "notes": notes}
    (out_dir / f"gpu_train_{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# GPU train benchmark, {stamp}, {', '.join(devices) or 'no result yet'}",
        "",
        "| arch | variant | micro-batch x GA, options | real tok/s | x Unsloth | x plain | MFU | peak alloc GiB | "
        "peak reserved GiB | loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = {}
    for r in results:
        if "tok_per_s" in r and (r["variant"] == "unsloth" or r["variant"].startswith("plain")):
            reference.setdefault((r["arch"], r["variant"].split(":")[0]), r["tok_per_s"])
    probes = []
    for r in results:
        arch = r.get("arch", "")
        if r["variant"] == "expqa:probe" and "longest_trained" in r:
            probes.append(r)
            continue
        if "tok_per_s" not in r:
            lines.append(f"| {arch} | {r['variant']} | {r.get('error', r.get('skipped', ''))[:160]} | | | | | | | |")
            continue
        reserved = r.get("peak_reserved_gib")
        lines.append(
            f"| {arch} | {r['variant']} | {shape_of(r)} | {r['tok_per_s']:,} | "
            f"{ratio(r['tok_per_s'], reference.get((arch, 'unsloth')))} | "
            f"{ratio(r['tok_per_s'], reference.get((arch, 'plain')))} | {r['mfu_vs_790T']:.0%} | "
            f"{r['peak_alloc_gib']} | {'' if reserved is None else reserved} | {r.get('last_loss')} |"
        )
    steps_text = (
        ", ".join(f"{a}: {w} warm-up + {t} timed" for a, (w, t) in STEPS.items())
        + "; plain: "
        + ", ".join(f"{w} + {t}" for w, t in PLAIN_STEPS.values())
    )
    lines += [
        "",
        "real tok/s: non-padding tokens per second over the timed optimizer steps after warm-up "
        f"({steps_text}); "
        "x Unsloth / x plain: ratio to the `unsloth` / plain row of the same architecture in this call. MFU: "
        "(4 + 2 x checkpointed layers / layers) x N FLOPs per token (N: parameters incl. embeddings; 3.21e9 and "
        "8.03e9) / 790 TFLOP/s bf16 dense (measured on the card; rows with FP8 base matmuls are counted against "
        "the same bf16 figure). Peak memory: torch.cuda.max_memory_allocated / max_memory_reserved, one process per "
        "row. loss: last logged training loss of random weights on each "
        "recipe's own batches, not comparable across rows (packed = unpacked loss is tested on CPU).",
    ]
    if probes:
        lines += [
            "",
            "| arch | longest conversation that trained | stopped by | peak alloc GiB | s per step | "
            "memory-bound estimate |",
            "|---|---|---|---|---|---|",
        ]
        for r in probes:
            best = next((t for t in reversed(r["trials"]) if t["ok"] and t["tokens"] == r["longest_trained"]), {})
            estimate = f"~{r['memory_bound_estimate']:,} tokens" if r.get("memory_bound_estimate") else ""
            lines.append(
                f"| {r['arch']} | {r['longest_trained']:,} tokens | {r['stopped_by']}"
                f"{' ' + format(r['first_oom'], ',') if r.get('first_oom') else ''} | "
                f"{best.get('peak_alloc_gib', '')} | {best.get('seconds', '')} | {estimate} |"
            )
        lines += [
            "",
            "Probe: one conversation of N random tokens, one optimizer step, train.gradient_checkpointing: "
            "full, the rest as shipped; N doubles from 16,384 up to the model's context (131,072), bisects "
            "after an out-of-memory error, and stops before a step whose predicted time would pass the time cap. "
            "Memory-bound estimate: the peak's linear growth between the last two lengths, extrapolated to 97 % "
            "of the card.",
        ]
    lines += [""] + [f"- {note}" for note in notes]
    text = "\n".join(lines) + "\n"
    (out_dir / f"gpu_train_{stamp}.md").write_text(text)
    return text


def short_table(results: list[dict]) -> str:
    rows = ["arch          variant                   tok/s  peak GiB  notes"]
    for r in results:
        if r["variant"] == "expqa:probe" and "longest_trained" in r:
            estimate = r.get("memory_bound_estimate")
            rows.append(
                f"{r['arch']:13} {'probe':22} {'':>8}  {str(r.get('peak_alloc_gib')):>8}  longest "
                f"{r['longest_trained']:,} ({r['stopped_by']})" + (f", memory-bound ~{estimate:,}" if estimate else "")
            )
        elif "tok_per_s" in r:
            note = (
                f"GC {r.get('gradient_checkpointing', '')} {r.get('checkpointed_layers', '')}".strip()
                if r["variant"].startswith("expqa")
                else r.get("recipe", "")[:40]
            )
            rows.append(
                f"{r.get('arch', ''):13} {r['variant']:22} {r['tok_per_s']:>8,}  "
                f"{str(r.get('peak_alloc_gib')):>8}  {note}"
            )
        else:
            rows.append(
                f"{r.get('arch', ''):13} {r['variant']:22} {'-':>8}  {'':>8}  "
                f"{(r.get('error') or r.get('skipped', ''))[:90]}"
            )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# the driver


def install_site(wheels: Path, target: Path, log: Path) -> str:
    """pip install --no-deps --target: a site folder of exactly these wheels; returns a one-line summary."""
    files = sorted(str(w) for w in wheels.glob("*.whl"))
    started = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--upgrade",
            "--target",
            str(target),
            *files,
        ],
        capture_output=True,
        text=True,
    )
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"installing {wheels} into {target} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return f"{len(files)} wheels from {wheels} -> {target} in {time.time() - started:.0f} s"


def child_env(site: Path | None) -> dict:
    paths = [str(site)] if site else []
    paths += [str(REPO / "src"), str(HERE)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DVC_NO_ANALYTICS": "1",
        "BENCH_DIR": str(common.WORK),
        "UNSLOTH_COMPILE_LOCATION": str(common.WORK / "unsloth_compiled_cache"),
        "UNSLOTH_DISABLE_STATISTICS": "1",
    }
    if common.DRY:
        env["BENCH_DRY_RUN"] = "1"
    return env


def run_child(args: list[str], env: dict, timeout: float, log: Path) -> tuple[dict | None, str]:
    """Run `gpu_train.py --one ...` in its own process; return (its RESULT, the tail of its output)."""
    with open(log, "w") as handle:
        try:
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), *args],
                env=env,
                cwd=str(REPO),
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return read_result(log, code, timeout)


def read_result(log: Path, code, timeout: float) -> tuple[dict | None, str]:
    text = log.read_text(errors="replace")
    results = [line[len("RESULT ") :] for line in text.splitlines() if line.startswith("RESULT ")]
    if results:
        return json.loads(results[-1]), ""
    last = ([line for line in text.strip().splitlines() if line.strip()] or ["no output"])[-1]
    if code == "timeout":
        return None, f"stopped at the {timeout:.0f} s limit; last line: {last}"[:400]
    return None, f"exit {code}: {last}"[:400]


def prepare_in_background(arch: str, tokenizer: Path, site: Path | None, log: Path) -> subprocess.Popen:
    """Random weights of a later architecture, made on the CPU with 4 threads while the GPU measures others."""
    env = {**child_env(site), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "4"}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--prepare", arch, str(tokenizer)],
        env=env,
        cwd=str(REPO),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )


def freeze_of_host(path: Path) -> set[str]:
    proc = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True)
    path.write_text(proc.stdout)
    return {line.split("==")[0].lower().replace("_", "-") for line in proc.stdout.splitlines() if "==" in line}


def pip_check(site: Path, log: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, env=child_env(site))
    log.write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return f"pip check with {site.name}: {len(lines)} line(s)" + (f", first: {lines[0]}" if lines else "")


def suite(args) -> int:
    common.DRY = args.dry_run
    if common.DRY:
        os.environ["BENCH_DRY_RUN"] = "1"
        common.WORK = Path(str(common.WORK) + "_dry")
    os.environ["BENCH_DIR"] = str(common.WORK)
    started = time.time()
    results_dir = Path(args.results)
    stamp = time.strftime("%Y-%m-%d_%H%M") + ("_dry" if common.DRY else "")
    logs = results_dir / f"gpu_train_{stamp}_logs"
    logs.mkdir(parents=True, exist_ok=True)
    common.WORK.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    host = freeze_of_host(logs / "host_pip_freeze.txt")
    sites = {}
    for key, wheels in (("expqa", args.wheels), ("unsloth", args.unsloth_wheels)):
        if not wheels:
            continue
        carried = sorted(w.name.split("-")[0].lower().replace("_", "-") for w in Path(wheels).glob("*.whl"))
        already = [name for name in carried if name in host]
        target = common.WORK / f"site_{key}"
        notes.append(
            install_site(Path(wheels), target, logs / f"install_{key}.log")
            + (f"; the host already has {', '.join(already)}" if already else "")
        )
        notes.append(pip_check(target, logs / f"pip_check_{key}.txt"))
        sites[key] = target
    print("\n".join(notes), flush=True)
    plan = list(SUITES[args.suite]) if args.suite else [(args.arch, v, 60) for v in args.variants]
    results: list[dict] = []
    bases: dict[str, Path] = {}
    failed: dict[str, str] = {}  # architecture -> why it has no checkpoint
    background: dict[str, subprocess.Popen] = {}
    data = common.WORK / "data"
    spent = []  # (expected, took) of the variants run so far: the estimates are scaled by how they held up
    for arch, variant, expected in plan:
        if arch in failed:
            results.append({"variant": variant, "arch": arch, "error": f"no checkpoint: {failed[arch]}"})
            continue
        elapsed = time.time() - started
        scale = min(max(sum(t for _, t in spent) / sum(e for e, _ in spent), 0.5), 2.0) if spent else 1.0
        making = 0 if arch in bases or arch in background else CHECKPOINT_SECONDS[arch]
        need = round(scale * expected + making)
        if args.budget and elapsed + need > args.budget:
            results.append(
                {
                    "variant": variant,
                    "arch": arch,
                    "skipped": f"skipped: {elapsed:.0f} s used + ~{need} s expected > {args.budget} s budget",
                }
            )
            print(f"skip {arch} {variant}: time budget", flush=True)
            continue
        site = sites.get("unsloth" if variant.startswith("unsloth") else "expqa")
        probe_seconds = 600 if common.DRY else max(20, expected - 40)  # the probe's trials, after loading the model
        env = {**child_env(site), "BENCH_PROBE_SECONDS": str(probe_seconds)}
        if arch not in bases:  # random weights once per architecture (and the data once), by a child
            t0 = time.time()
            log = logs / f"prepare_{arch}.log"
            if arch in background:
                try:
                    code = background.pop(arch).wait(timeout=600)
                except subprocess.TimeoutExpired:
                    code = "timeout"
                result, tail = read_result(log, code, 600)
            else:
                result, tail = run_child(
                    ["--prepare", arch, str(args.tokenizer)], child_env(sites.get("expqa")), 600, log
                )
            if result is None:
                failed[arch] = tail
                results.append({"variant": variant, "arch": arch, "error": f"no checkpoint: {tail}"})
                print(f"prepare {arch} failed: {tail}", flush=True)
                continue
            bases[arch], data = Path(result["base"]), Path(result["data"])
            notes.append(f"{arch}: random checkpoint ready after {time.time() - t0:.0f} s more")
            for other in dict.fromkeys(a for a, _, _ in plan):  # the later architectures' weights, meanwhile
                if other not in bases and other not in background and other not in failed:
                    background[other] = prepare_in_background(
                        other, args.tokenizer, sites.get("expqa"), logs / f"prepare_{other}.log"
                    )
        remaining = (args.budget - (time.time() - started)) if args.budget else 3600
        timeout = 900.0 if common.DRY else max(30.0, min(remaining, need * 3))  # a shared CPU is slow and uneven
        t0 = time.time()
        result, tail = run_child(
            ["--one", variant, arch, str(bases[arch]), str(data)], env, timeout, logs / f"{arch}_{variant}.log"
        )
        if result is None:
            result = {"variant": variant, "arch": arch, "error": tail}
        result["wall_seconds"] = round(time.time() - t0, 1)
        spent.append((expected, result["wall_seconds"]))
        results.append(result)
        print("RESULT", json.dumps({k: v for k, v in result.items() if k != "trials"}), flush=True)
        write_tables(results_dir, stamp, results, notes)
    for proc in background.values():  # not needed after all (their variants were skipped)
        proc.kill()
    notes.append(f"whole call: {time.time() - started:.0f} s")
    text = write_tables(results_dir, stamp, results, notes)
    print(text, flush=True)
    print(short_table(results), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:
        name, arch, base, data = argv[1:5]
        run_one(name, arch, Path(base), Path(data))
        return 0
    if argv[:1] == ["--prepare"]:
        data = common.WORK / "data"
        if not (data / "train.jsonl").exists():
            make_data(1200, data)  # enough 32k-token packs for 10 steps
        emit({"base": str(make_base(argv[1], Path(argv[2]))), "data": str(data)})
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help=f"{', '.join(VARIANTS)}, {', '.join(SPECIAL)}")
    parser.add_argument("--suite", choices=sorted(SUITES))
    parser.add_argument("--arch", choices=ARCHS, default=os.environ.get("ARCH", "llama-3.2-3b"))
    parser.add_argument("--results", default=str(RESULTS), help="tables, logs, host freeze (on a lent GPU: $OUT)")
    parser.add_argument(
        "--tokenizer", type=Path, default=Path(os.environ.get("TOKENIZER_DIR", REPO / "models" / "base"))
    )
    parser.add_argument("--wheels", help="wheels for the project's variants (one --target site folder)")
    parser.add_argument("--unsloth-wheels", help="wheels for the Unsloth variants (a second site folder)")
    parser.add_argument("--budget", type=float, default=0, help="seconds for the whole suite; 0 = no limit")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models: test the driver")
    args = parser.parse_args(argv)
    if not args.suite and not args.variants:
        args.variants = ["plain", "params"]
    unknown = [v for v in args.variants if v not in VARIANTS and v not in SPECIAL]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}")
    return suite(args)


if __name__ == "__main__":
    sys.exit(main())
