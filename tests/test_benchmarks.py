"""The GPU benchmark's pieces that run before any GPU does: wheel trimming and the offline requirement check
(benchmarks/wheelhouse.py), the suite's variant names, and the tables (benchmarks/gpu_train.py). The whole driver is
exercised on CPU by `python benchmarks/gpu_train.py --suite issue21 --dry-run` (minutes; not part of the suite)."""

import sys
import zipfile

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_train  # noqa: E402
import unsloth_recipe  # noqa: E402
import wheelhouse  # noqa: E402


def make_wheel(folder, name, version, files, requires=()):
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for file in files:
            archive.writestr(file, b"x" * 1000)
        archive.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)))
        archive.writestr(f"{dist}/RECORD", "".join(f"{f},sha256=x,1000\n" for f in files) + f"{dist}/RECORD,,\n")
    return path


def test_cuda_trim_keeps_one_cuda_build_and_drops_rocm(tmp_path):
    libs = [f"bitsandbytes/libbitsandbytes_{v}.so" for v in ("cpu", "cuda126", "cuda130", "rocm71", "rocm714")]
    wheel = make_wheel(tmp_path, "bitsandbytes", "0.50.2", ["bitsandbytes/__init__.py"] + libs)
    assert wheelhouse.trim_cuda_libraries(wheel, "130") > 0
    names = zipfile.ZipFile(wheel).namelist()
    kept = [n for n in names if n.endswith(".so")]
    assert kept == ["bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"]
    record = zipfile.ZipFile(wheel).read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert "rocm" not in record and "cuda126" not in record and "cuda130" in record
    with pytest.raises(SystemExit, match="no library for CUDA 118"):
        wheelhouse.trim_cuda_libraries(wheel, "118")


def test_drop_folder_rewrites_the_wheel_and_its_record(tmp_path):
    wheel = make_wheel(tmp_path, "unsloth", "2026.10.9",
                       ["unsloth/__init__.py", "studio/frontend/app.js", "studio/backend/server.py"])
    assert wheelhouse.drop_folders(wheel, ["studio/"]) > 0
    names = zipfile.ZipFile(wheel).namelist()
    assert "unsloth/__init__.py" in names and not any(n.startswith("studio/") for n in names)
    assert "studio" not in zipfile.ZipFile(wheel).read("unsloth-2026.10.9.dist-info/RECORD").decode()


def test_check_reads_requirements_against_the_set_and_the_host(tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    make_wheel(site, "tool", "1.0", ["tool/__init__.py"],
               requires=["trl<=1.15", "datasets<5", "torch>=2.4", "missing", "windows-only; sys_platform == 'win32'",
                         "extra-only; extra == 'studio'", "certifi>=2026.1"])
    make_wheel(site, "trl", "1.15.0", ["trl/__init__.py"])
    make_wheel(site, "datasets", "5.2.0", ["datasets/__init__.py"])
    host = {"torch": "2.11.0", "certifi": ""}
    problems = wheelhouse.check([site], "3.12", host)
    assert problems == ["site: tool needs datasets<5: datasets 5.2.0 there",
                        "site: tool needs missing: neither shipped nor on the host"]
    assert "certifi>=2026.1 (tool)" in capsys.readouterr().out  # unknown host version: reported, not failed


def test_host_list_reads_bare_names_as_present(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# comment\ntorch==2.11.0+cu130\nPyYAML\nhuggingface_hub==1.33.0\n")
    assert wheelhouse.read_pins(freeze) == {"torch": "2.11.0", "pyyaml": "", "huggingface-hub": "1.33.0"}


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
    base = dict(fused_lora=True, grouped_lora=True, tokens_per_micro_batch=16384, micro_batch=16, grad_accum=1,
                lora_dropout=0.0, optim="adamw_torch_fused", mfu_vs_790T=0.5, peak_alloc_gib=45.0,
                peak_reserved_gib=50.0, last_loss=10.7, device="NVIDIA H200")
    results = [
        {"variant": "expqa:params", "arch": "llama-3.2-3b", "tok_per_s": 36000, "gradient_checkpointing": "off",
         "gradient_checkpointing_requested": "auto", "checkpointed_layers": "0/28", **base},
        {"variant": "unsloth", "arch": "llama-3.2-3b", "tok_per_s": 18000, "recipe": "Unsloth: packed",
         "mfu_vs_790T": 0.4, "peak_alloc_gib": 9.0, "peak_reserved_gib": 12.0, "last_loss": 10.8},
        {"variant": "plain:real_pad", "arch": "llama-3.2-3b", "tok_per_s": 1200, "mfu_vs_790T": 0.03,
         "peak_alloc_gib": 10.4, "peak_reserved_gib": 21.3, "last_loss": 12.3},
        {"variant": "expqa:params", "arch": "llama-3.1-8b", "tok_per_s": 13000, "gradient_checkpointing": "selective",
         "gradient_checkpointing_requested": "auto", "checkpointed_layers": "5/32", **base},
        {"variant": "unsloth", "arch": "llama-3.1-8b", "error": "exit 1: RuntimeError: every setup failed"},
        {"variant": "plain", "arch": "llama-3.1-8b", "skipped": "skipped: 500 s used + ~80 s expected > 520 s"},
        {"variant": "expqa:probe", "arch": "llama-3.2-3b", "longest_trained": 131072, "first_oom": None,
         "stopped_by": "the model's context (max_position_embeddings)", "memory_bound_estimate": 400000,
         "peak_alloc_gib": 41.0, "trials": [{"tokens": 131072, "ok": True, "seconds": 25.0, "peak_alloc_gib": 41.0}]},
    ]
    text = gpu_train.write_tables(tmp_path, "stamp", results, ["a note"])
    rows = {line.split(" | ")[1] + "@" + line.split(" | ")[0].strip("| "): line for line in text.splitlines()
            if line.startswith("| llama")}
    assert "| 36,000 | 2.00 | 30.00 |" in rows["expqa:params@llama-3.2-3b"]
    assert "GC auto -> off" in rows["expqa:params@llama-3.2-3b"]
    assert "GC auto -> selective (5/32 layers)" in rows["expqa:params@llama-3.1-8b"]
    assert "every setup failed" in rows["unsloth@llama-3.1-8b"] and "skipped" in rows["plain@llama-3.1-8b"]
    assert "| llama-3.2-3b | 131,072 tokens | the model's context" in text and "~400,000 tokens" in text
    assert (tmp_path / "gpu_train_stamp.json").exists() and "- a note" in text
    short = gpu_train.short_table(results)
    assert "longest 131,072" in short and "36,000" in short and "every setup failed" in short
