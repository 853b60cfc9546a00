"""Several processes on CPU (gloo): DDP and FSDP2 with the same global batch learn what 1 process learns, an external
launch is not relaunched, two torchrun agents joined like two machines train together, only rank 0 writes."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from expqa.training import distributed
from helpers import REPO, write_params, write_processed

STAGE = str(REPO / "stages" / "train.py")
CPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def write_run_params(run_dir, processes, micro_batch, quantized=False, **train):
    write_params(
        run_dir / "params.yaml",
        {
            "lora": dict(r=4, alpha_ratio=2.0, dropout=0.0),  # dropout draws different random numbers per process
            "cpu.quantization": dict(load_in_4bit=quantized),
            "cpu.train": dict(
                dict(
                    max_steps=3,
                    eval_steps=3,
                    save_steps=100,
                    logging_steps=1,
                    max_seq_length=128,
                    micro_batch=f"{micro_batch} conversations",
                    gradient_accumulation_steps=1,
                    learning_rate=1e-2,
                    warmup_ratio=0.0,
                    num_threads=1,
                    num_processes=processes,
                ),
                **train,
            ),
        },
    )


def stage_args(run_dir, base, data):
    """The stage's arguments, every output inside run_dir."""
    return [
        "--params",
        str(run_dir / "params.yaml"),
        "--base",
        str(base),
        "--data",
        str(data),
        "--out",
        str(run_dir / "adapter"),
        "--checkpoints",
        str(run_dir / "ckpt"),
        "--metrics",
        str(run_dir / "metrics"),
        "--log-folder",
        str(run_dir / "logs"),
    ]


def train(run_dir, base, data, processes, micro_batch, launcher=(), quantized=False, **overrides):
    if not (run_dir / "params.yaml").exists():
        write_run_params(run_dir, processes, micro_batch, quantized, **overrides)
    result = subprocess.run(
        [sys.executable, *launcher, STAGE, *stage_args(run_dir, base, data)],
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=900,
        env=CPU_ENV,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(run_dir):
    rows = (run_dir / "metrics" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[1]) for row in rows]


def record(run_dir):
    return json.loads((run_dir / "adapter" / "training_config.json").read_text())


def assert_same_learning(run, reference):
    """The same loss at every step and the same val loss after training. (Weights are compared through the loss:
    Adam divides by sqrt(v), so rounding differences in the reduction of near-zero gradients move individual weights by
    up to lr while leaving the function the model computes unchanged.)"""
    assert len(losses(reference)) == 3
    assert losses(run) == pytest.approx(losses(reference), rel=1e-4)
    got, expected = record(run)["metrics"], record(reference)["metrics"]
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4)
    assert got["eval_loss"] < got["eval_loss_before_training"]
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert max(w.abs().max().item() for k, w in weights.items() if "lora_B" in k) > 1e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_processed(tmp_path_factory.mktemp("distributed") / "processed")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_base, data):
    """The reference: 1 process, micro-batch 4 (the global batch of 2 processes x 2)."""
    run_dir = tmp_path_factory.mktemp("one")
    train(run_dir, tiny_base, data, processes=1, micro_batch=4)
    assert record(run_dir)["config"]["world_size"] == 1
    return run_dir


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_base, data, one_process, tmp_path):
    log = train(tmp_path / "ddp", tiny_base, data, processes=2, micro_batch=2)
    assert "launching 2 processes" in log.stdout and "--standalone" in log.stdout
    assert log.stdout.count("train: {") == 1, "only rank 0 reports"
    assert record(tmp_path / "ddp")["config"]["world_size"] == 2
    assert_same_learning(tmp_path / "ddp", one_process)
    assert (tmp_path / "ddp" / "metrics" / "metrics.json").exists()


@pytest.mark.slow
def test_fsdp_under_an_external_torchrun_shards_and_matches_one_process(tiny_base, data, one_process, tmp_path):
    """`torchrun --nproc_per_node=2 stages/train.py` (what `accelerate launch`, a cluster launcher or torchrun on each
    node does): the stage trains in the launcher's processes, never launches its own (params ask for 3), and FSDP2
    shards the weights in half, checkpoints every decoder layer, and gives the 1-process losses and a same-layout
    adapter that merge loads."""
    from expqa.model.merge import merge_adapter

    run_dir = tmp_path / "fsdp"
    log = train(
        run_dir,
        tiny_base,
        data,
        processes=3,
        micro_batch=2,
        distributed="fsdp",
        gradient_checkpointing=True,
        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
    )
    assert "train: launching" not in log.stdout, "an external launch must not be relaunched"
    assert record(run_dir)["config"]["world_size"] == 2 and record(run_dir)["config"]["train"]["distributed"] == "fsdp"
    summary = next(line for line in log.stdout.splitlines() if line.startswith("train: fsdp over 2 processes"))
    held, total = (float(x) for x in summary.split("holds ")[1].split(" MiB")[0].split(" of "))
    assert held < 0.55 * total, summary  # the weights are sharded (the tiny model has 2 decoder layers)
    assert "2 decoder layers checkpointed by FSDP" in summary
    assert log.stdout.count("train: {") == 1, "only rank 0 reports"
    assert_same_learning(run_dir, one_process)
    # the same Hugging Face layout as a single-process adapter: same files, tensors and config
    adapter, reference = run_dir / "adapter", one_process / "adapter"
    assert {p.name for p in adapter.iterdir()} == {p.name for p in reference.iterdir()}
    assert (adapter / "adapter_config.json").read_text() == (reference / "adapter_config.json").read_text()
    got, expected = load_file(adapter / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in expected.items()}
    report = merge_adapter(tiny_base, adapter, tmp_path / "merged")
    assert report["passed"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_machines_joined_by_torchrun_static_rendezvous(tiny_base, data, one_process, tmp_path):
    """Two nodes of one process each, as on two machines (each its own folder; here on one host): the stage on each
    (run by `dvc repro` on node 0) relaunches under torchrun with the PET_* rendezvous variables instead of
    --standalone. Node 0 holds rank 0 and writes every output; node 1 writes none (only its RNG state in the
    checkpoint folder, which machines share when a run is to be resumed)."""
    rendezvous = {"PET_NNODES": "2", "PET_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}
    nodes = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        write_run_params(node, processes=1, micro_batch=2)
        nodes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    STAGE,
                    "--params",
                    "params.yaml",
                    "--base",
                    str(tiny_base),
                    "--data",
                    str(data),
                    "--out",
                    "adapter",
                    "--checkpoints",
                    "ckpt",
                    "--metrics",
                    "metrics",
                    "--log-folder",
                    "logs",
                ],
                cwd=node,
                env={**CPU_ENV, **rendezvous, "PET_NODE_RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [proc.communicate(timeout=900)[0] for proc in nodes]
    assert [proc.returncode for proc in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for log in logs:
        assert "launching 1 process (1 OpenMP thread each, one node of 2)" in log and "--standalone" not in log
    assert logs[0].count("train: {") == 1 and "train: {" not in logs[1]
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    assert record(node0)["config"]["world_size"] == 2
    assert_same_learning(node0, one_process)
    assert (node0 / "metrics" / "metrics.json").exists() and (node0 / "logs" / "training.log").exists()
    written = sorted(str(p.relative_to(node1)) for p in node1.rglob("*") if p.is_file() and p.name != "params.yaml")
    assert all(name.startswith("ckpt/") and name.endswith("rng_state_1.pth") for name in written), written


@pytest.mark.slow
def test_fsdp_qlora_with_fused_lora_matches_one_process_and_resumes(tiny_base, data, tmp_path):
    """4-bit base (nf4 stored in the compute dtype) + fused LoRA + checkpointing under FSDP2, 2 processes relaunched by
    the stage: the 1-process losses; killed after checkpoint 2 (simulated: its later checkpoint and outputs removed),
    the run resumes from the FSDP checkpoint and ends with a bit-identical adapter."""
    reference, fsdp = tmp_path / "qlora", tmp_path / "qlora_fsdp"
    common = dict(quantized=True, max_steps=4, save_steps=2, eval_steps=4, fused_lora=True, gradient_checkpointing=True)
    train(reference, tiny_base, data, processes=1, micro_batch=4, **common)
    log = train(fsdp, tiny_base, data, processes=2, micro_batch=2, distributed="fsdp", **common)
    assert "launching 2 processes" in log.stdout and "train: fsdp over 2 processes" in log.stdout
    # 2 shards vs 1 process: other reduction orders, in bf16 where the CPU has avx512_bf16/AMX (4-bit weights stored
    # in the compute dtype). On a Sapphire Rapids CPU the val loss after 4 steps differed by 1.04e-4 relative
    # (benchmarks/results/cpu_suite_2026-12-06_sapphire_rapids_avx512.log): 5e-4, 5 times that; a shard whose
    # gradient is lost trains on half the batch, which moves the losses from the second step on by far more
    assert losses(fsdp) == pytest.approx(losses(reference), rel=5e-4)
    assert record(fsdp)["metrics"]["eval_loss"] == pytest.approx(record(reference)["metrics"]["eval_loss"], rel=5e-4)
    checkpoint = fsdp / "ckpt" / "checkpoint-2"
    assert {"optimizer.bin", "pytorch_model_fsdp.bin", "adapter_model.safetensors"} <= {
        p.name for p in checkpoint.iterdir()
    }
    finished = load_file(fsdp / "adapter" / "adapter_model.safetensors")
    for path in (fsdp / "ckpt" / "checkpoint-4", fsdp / "adapter"):
        subprocess.run(["rm", "-r", str(path)], check=True)
    log = train(fsdp, tiny_base, data, processes=2, micro_batch=2)
    assert f"train: resuming from {checkpoint}" in log.stdout
    assert json.loads((fsdp / "logs" / "train_run.json").read_text())["resumed_from_step"] == 2
    resumed = load_file(fsdp / "adapter" / "adapter_model.safetensors")
    # exact on any CPU: both are this machine's 2-process FSDP run (same shards, same gloo reduction order, 1 thread
    # each); resuming reloads bit-exact state and repeats the uninterrupted run's steps 3-4 kernel for kernel
    assert all(torch.equal(resumed[k], finished[k]) for k in finished)


@pytest.mark.slow
def test_linear4bit_output_is_unchanged_by_fully_shard_on_gloo(tmp_path):
    """bitsandbytes #1945: FSDP2 said to rewrite packed 4-bit bytes that read as bf16 NaNs. The check the GPU script
    (benchmarks/fsdp_check.py) runs on CUDA, here on 2 gloo processes."""
    script = tmp_path / "check.py"
    script.write_text(
        "import json, sys, torch.distributed as dist\n"
        f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
        "from fsdp_check import linear4bit_fully_shard_check\n"
        "dist.init_process_group('gloo')\n"
        "print('RESULT', json.dumps(linear4bit_fully_shard_check('cpu')), flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=CPU_ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checks = [json.loads(line.split("RESULT ", 1)[1]) for line in result.stdout.splitlines() if "RESULT " in line]
    assert len(checks) == 2 and all(c["identical"] and c["packed_values_that_are_bf16_nan"] > 0 for c in checks)


# ---------------------------------------------------------------------------------------------------------------
# launch decisions, without launching


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*distributed.LAUNCH_VARIABLES, *distributed.MULTI_NODE_VARIABLES, "PET_NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "processes,mode,expected", [(1, "ddp", False), (2, "ddp", True), (1, "fsdp", True), (4, "fsdp", True)]
)
def test_the_stage_launches_only_outside_a_launch(clean_env, processes, mode, expected):
    assert distributed.needs_launch(processes, mode) is expected
    for name in distributed.LAUNCH_VARIABLES:  # torchrun, accelerate launch, a cluster launcher
        with pytest.MonkeyPatch.context() as inside:
            inside.setenv(name, "0")
            assert distributed.needs_launch(processes, mode) is False, name


def test_several_machines_use_torchruns_rendezvous_variables(clean_env):
    assert "--standalone" in distributed.torchrun_command("pkg.stage", [], 2)
    assert distributed.needs_launch(1, "ddp") is False
    clean_env.setenv("PET_NNODES", "2")
    clean_env.setenv("PET_RDZV_ENDPOINT", "node0:29500")
    assert distributed.needs_launch(1, "ddp") is True  # one process here, more on the other machines
    cmd = distributed.torchrun_command("pkg.stage", ["--x"], 8)
    assert "--standalone" not in cmd and cmd[-4:] == ["--nproc_per_node=8", "-m", "pkg.stage", "--x"]


class FakeLauncher:
    """A torchrun process: wait() runs `during` (e.g. a Ctrl-C arriving) and returns the given exit code."""

    pid = 0  # no process has parent 0 on Linux but the kernel's own: nothing is signalled

    def __init__(self, code, during=lambda: None):
        self.code, self.during = code, during

    def wait(self):
        self.during()
        return self.code


def ctrl_c_twice():
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("code,expected", [(0, 130), (1, 1)])
def test_ctrl_c_is_passed_to_the_workers_and_reported_as_130(clean_env, monkeypatch, capsys, code, expected):
    """torchrun runs in its own session (a terminal's Ctrl-C reaches the stage only); the stage passes each signal
    on to the workers, waits, and turns their clean stop (exit 0) into 130, silently; a failure keeps its code."""
    started = {}

    def popen(cmd, **kwargs):
        started.update(kwargs)
        return FakeLauncher(code, during=ctrl_c_twice)

    monkeypatch.setattr(distributed.subprocess, "Popen", popen)
    before = signal.getsignal(signal.SIGINT)
    assert distributed.relaunch("s.py", [], 2, num_threads=1) == expected
    assert started["start_new_session"] is True and started["env"][distributed.RELAUNCHED_VARIABLE] == "1"
    assert signal.getsignal(signal.SIGINT) is before  # the stage's own handlers are back
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "cores,processes,num_threads,environment,expected",
    [
        (2, 2, 0, None, 1),  # the cpu profile on 2 cores: one core each (torchrun's default, now said)
        (16, 2, 0, None, 8),  # a share of the cores, not torchrun's 1
        (7, 2, 0, None, 3),  # never more threads than cores
        (2, 4, 0, None, 1),  # at least one
        (16, 2, 2, None, 2),  # train.num_threads: the threads torch uses anyway
        (16, 2, 2, "5", 5),  # the user's own OMP_NUM_THREADS wins, as under torchrun itself
    ],
)
def test_each_worker_gets_its_share_of_the_cores_as_openmp_threads(
    clean_env, capsys, cores, processes, num_threads, environment, expected
):
    clean_env.setattr(distributed, "cpu_cores", lambda: cores)
    if environment is None:
        clean_env.delenv("OMP_NUM_THREADS", raising=False)
    else:
        clean_env.setenv("OMP_NUM_THREADS", environment)
    assert distributed.openmp_threads(processes, num_threads) == expected
    started = {}
    clean_env.setattr(distributed.subprocess, "Popen", lambda cmd, **kwargs: started.update(kwargs) or FakeLauncher(0))
    assert distributed.relaunch("s.py", [], processes, num_threads=num_threads) == 0
    assert started["env"]["OMP_NUM_THREADS"] == str(expected)  # set: torchrun prints no banner about its default
    assert f"({expected} OpenMP thread{'' if expected == 1 else 's'} each)" in capsys.readouterr().out


def test_child_pids_finds_the_launchers_workers():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in distributed.child_pids(os.getpid())
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("node_rank,written,expected", [("0", False, 1), ("0", True, 0), ("1", False, 0)])
def test_node_0_fails_when_rank_0_wrote_elsewhere(clean_env, tmp_path, capsys, node_rank, written, expected):
    clean_env.setenv("PET_NNODES", "2")
    clean_env.setenv("PET_NODE_RANK", node_rank)
    clean_env.setattr(distributed.subprocess, "Popen", lambda cmd, **kwargs: FakeLauncher(0))
    if written:
        (tmp_path / "adapter").mkdir()
    assert distributed.relaunch("s.py", [], 1, num_threads=1, output=tmp_path / "adapter") == expected
    assert ("rank 0 ran on another one" in capsys.readouterr().err) is (expected == 1)


def test_fsdp_arguments_bf16_compute_fp32_reduction_and_layer_checkpointing(tiny_base, tmp_path, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    from expqa.training import trainer as trainer_module
    from helpers import tiny_training_config

    _, config = tiny_training_config(distributed="fsdp", gradient_checkpointing=True, bf16=True)
    params, _ = tiny_training_config()
    runner = trainer_module.QLoRATrainer(
        config,
        lora=params.lora,
        quantization=params.quantization,
        seed=params.base.seed,
        base_model=tiny_base,
        data_dir=tmp_path,
        checkpoint_dir=tmp_path,
        metrics_dir=None,
        log_dir=None,
    )
    runner.plan = dataclasses.replace(runner.plan, bf16=True)  # as the plan decides on a GPU
    args = runner._sft_config(False, AutoModelForCausalLM.from_pretrained(tiny_base))
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    plugin.set_mixed_precision("bf16")  # what Accelerate does with bf16=True: our policy is kept
    assert plugin.fsdp_version == 2 and plugin.activation_checkpointing and not args.gradient_checkpointing
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type) and not plugin.cpu_ram_efficient_loading


def test_torchrun_passes_every_train_stage_option_to_the_workers():
    """torchrun's own parser matches abbreviations anywhere in its command line: a stage option that begins one of its
    options (`--logs` of `--logs-specs`) stops the launch with "ambiguous option"."""
    from torch.distributed.run import get_args_parser

    from expqa.pipeline import train

    args = [item for option in [*train.PATHS.split(), "--params", "--config"] for item in (option, "x")]
    parsed = get_args_parser().parse_args(distributed.torchrun_command("expqa.pipeline.train", args, 2)[3:])
    assert (parsed.module, parsed.training_script, parsed.training_script_args) == (True, "expqa.pipeline.train", args)
