"""Several processes for one `train` stage: DDP or FSDP2 through the HF Trainer (Accelerate), launched by torchrun.

`dvc repro train` stays the command. When `train.num_processes` asks for more than one process (0 = one per
visible GPU), or `train.distributed` is fsdp (the Trainer shards only inside a distributed launch, even a launch of
one process), the stage re-runs itself under `torch.distributed.run` (torchrun). A process that is already inside
a launch (torchrun on each node, `accelerate launch`, a cluster launcher: WORLD_SIZE / RANK / LOCAL_RANK set) is
never relaunched. Several machines: torchrun's own PET_* environment variables (PET_NNODES, PET_NODE_RANK,
PET_RDZV_ENDPOINT, ...) reach the relaunch, which then uses them instead of `--standalone` (README "Several GPUs /
several machines").

- ddp: the Trainer wraps the model in DistributedDataParallel; each process holds the whole 4-bit base on its GPU.
- fsdp: FSDP2 (`fully_shard`, through Accelerate's FSDP plugin) with one unit per decoder layer: the base weights
  (4-bit ones stored in the compute dtype, `bnb_4bit_quant_storage`, so that they can be sharded), the LoRA weights,
  their gradients and the optimizer state are split across the processes and gathered layer by layer. Mixed
  precision bf16 compute with float32 gradient reduction; activation checkpointing is FSDP's (Accelerate wraps each
  decoder layer), not the model's. The adapter is gathered in full (LoRA weights only, never the base) and rank 0
  writes it in the same Hugging Face layout as a single-process run.

Only rank 0 writes files (adapter, metrics, checkpoints' fingerprint, logs). On CPU the same launch uses gloo, which
is how the tests check that 2 processes learn what 1 process does with the same global batch, in both modes.
On Linux, torchrun and its workers die with their parent: a stage killed outright (SIGKILL, the OOM killer) leaves
no orphan still training and writing checkpoints that the next run would resume from.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from expqa.wording import plural

# set by torchrun (and so by `accelerate launch`) in every worker; cluster launchers that start the workers
# themselves set them too (or are told to: README)
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
RELAUNCHED_VARIABLE = "EXPQA_RELAUNCHED"  # set by relaunch() for its workers
# torchrun reads each of its options from PET_<OPTION> when it is not on the command line; these ones mean "a job
# of several machines", which `--standalone` (a rendezvous on localhost) would override
MULTI_NODE_VARIABLES = ("PET_NNODES", "PET_RDZV_ENDPOINT", "PET_MASTER_ADDR")
CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."  # what activation checkpointing adds to parameter names


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def inside_launch() -> bool:
    """This process was started by a distributed launcher (torchrun, accelerate launch, a cluster launcher)."""
    return any(name in os.environ for name in LAUNCH_VARIABLES)


def multi_node_requested() -> bool:
    return any(os.environ.get(name) for name in MULTI_NODE_VARIABLES)


def wanted_processes(num_processes: int) -> int:
    """train.num_processes resolved: 0 = one per visible CUDA device (at least 1)."""
    if num_processes > 0:
        return num_processes
    import torch

    return max(torch.cuda.device_count(), 1)


def local_devices() -> tuple[int, str]:
    """How many processes this machine can give a device each, and what they are: CUDA GPUs (NCCL) when CUDA is
    visible, else CPU cores (gloo; the cpu profile hides the GPUs: pipeline.check_profile)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA GPU"
    return cpu_cores(), "CPU core"


def cpu_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was gone before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def needs_launch(processes: int, distributed: str) -> bool:
    """Whether the stage must start torchrun workers instead of training in this process."""
    if inside_launch():
        return False
    return processes > 1 or distributed == "fsdp" or multi_node_requested()


def torchrun_command(module: str, args: list[str], processes: int) -> list[str]:
    """torchrun on this machine running `python -m module args` in each worker; `--standalone` unless PET_*
    variables describe a job of several machines."""
    rendezvous = [] if multi_node_requested() else ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc_per_node={processes}",
        "-m",
        module,
        *args,
    ]


def openmp_threads(processes: int, num_threads: int) -> int:
    """OpenMP threads per worker: the user's OMP_NUM_THREADS if set, else train.num_threads if set (torch uses that
    many anyway), else this machine's cores shared out, one share per process.

    torchrun's own choice without the variable is 1 (and a banner saying so): right for the cpu profile's 2 processes
    on 2 cores, which this gives too, but a GPU worker on a 16-core host would then run its CPU side (bitsandbytes'
    and torch's CPU ops, the collator) on one core while 15 idle. More than a share oversubscribes the cores: each
    OpenMP region waits for its slowest thread, and threads of different processes on one core take turns."""
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return num_threads or max(cpu_cores() // processes, 1)


def relaunch(module: str, args: list[str], processes: int, *, num_threads: int, output: Path | None = None) -> int:
    """Run `python -m module args` as `processes` torchrun workers on this machine; return their exit code.

    `num_threads`: train.num_threads (0 = a share of the cores: openmp_threads). `output`: what rank 0 writes. On
    node 0 of a job of several machines (PET_NODE_RANK=0, static rendezvous) it must exist afterwards, or rank 0 ran
    elsewhere and `dvc repro` here would record nothing."""
    cmd = torchrun_command(module, args, processes)
    threads = openmp_threads(processes, num_threads)
    nodes = f", one node of {os.environ.get('PET_NNODES', '?')}" if multi_node_requested() else ""
    print(
        f"train: launching {plural(processes, 'process', 'processes')} ({plural(threads, 'OpenMP thread')} each"
        f"{nodes}): {' '.join(cmd[1:])}",
        flush=True,
    )
    # torchrun in a session of its own: on Ctrl-C its agent would tear the workers down (SIGKILL after 30 s, and a
    # traceback) instead of letting them save; the signal is passed on to the workers alone (Linux; elsewhere
    # torchrun shares the terminal's process group as before)
    forward = Path("/proc").is_dir()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # set, torchrun prints no banner about its default
    if forward:
        env[RELAUNCHED_VARIABLE] = "1"
    launcher = subprocess.Popen(cmd, preexec_fn=die_with_parent, start_new_session=forward, env=env)
    code, interrupted = _wait_forwarding_signals(launcher, forward)
    if interrupted and code == 0:  # the workers saved a checkpoint and stopped, and said so
        return 130
    if (
        code == 0
        and output is not None
        and multi_node_requested()
        and os.environ.get("PET_NODE_RANK") == "0"
        and not output.exists()
    ):
        print(
            f"error: {output} was not written on this machine: rank 0 ran on another one. Use torchrun's static "
            'rendezvous (PET_NODE_RANK=0 here, 1, 2, ... on the others; README "Several GPUs / several machines")',
            file=sys.stderr,
        )
        return 1
    return code


def _wait_forwarding_signals(launcher: subprocess.Popen, forward: bool) -> tuple[int, bool]:
    """The launcher's exit code, and whether SIGINT/SIGTERM came. Each one is passed on to the workers (torchrun's
    children), which save a checkpoint at the next logged step and stop, or abort on a second signal; here the
    default handler would only kill the launcher (and print a traceback)."""
    received = []

    def pass_on(signum, frame):
        received.append(signum)
        for pid in child_pids(launcher.pid) if forward else ():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # already gone
                pass

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return launcher.wait(), bool(received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is `parent`, from /proc (field 4 of /proc/PID/stat, after the command in brackets)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # exited meanwhile
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def relaunched() -> bool:
    """A worker of relaunch(): it reports an interrupt with exit code 0 and relaunch() turns that into 130 (a worker's
    non-zero code makes torchrun print a failure report of its own)."""
    return os.environ.get(RELAUNCHED_VARIABLE) == "1"


def agree_across_processes(fingerprint: dict, checkpoint):
    """Every process (on several machines: each with its own copy of the inputs) must train on the same params, data
    and base weights: stop naming the ranks that differ. Returns the checkpoint to resume, or None (start over) when
    the processes found different ones: each machine looks in its own `--checkpoints` folder and rank 0 alone writes
    checkpoints, so only a folder on a filesystem that all machines share (NFS, Lustre, ...) can be resumed from;
    resuming on some processes only would hang the job."""
    if world_size() == 1:
        return checkpoint
    import hashlib
    import json

    import torch.distributed as dist

    mine = (
        hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest(),
        None if checkpoint is None else checkpoint.name,
    )
    found = [None] * world_size()
    dist.all_gather_object(found, mine)
    differ = [rank for rank, (inputs, _) in enumerate(found) if inputs != found[0][0]]
    if differ:
        raise ValueError(
            f"ranks {differ} have other params, data or base weights than rank 0 (params.yaml, "
            "data/processed, models/base must be the same on every machine: dvc pull there)"
        )
    if len({name for _, name in found}) == 1:
        return checkpoint
    if is_main_process():
        print(
            f"train: not resuming: the processes found different checkpoints "
            f"({sorted({str(name) for _, name in found})}); for a job on several machines put --checkpoints on a "
            "filesystem they all share",
            flush=True,
        )
    return None


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 through the Trainer


def decoder_layer_classes(model) -> list[str]:
    """The classes FSDP wraps one unit each (and checkpoints): the model's `_no_split_modules` (LlamaDecoderLayer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = list(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(
            f"train.distributed: fsdp needs the decoder layer class of {type(base).__name__} "
            "(`_no_split_modules` is empty); use train.distributed: ddp"
        )
    return names


def fsdp_trainer_args(model, activation_checkpointing: bool) -> dict:
    """TrainingArguments fields that turn on FSDP2 for this model (auto wrap per decoder layer), with FSDP's own
    activation checkpointing on every decoder layer when the run plan checkpoints (the model's own is never turned
    on under FSDP: both would recompute every layer twice)."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": decoder_layer_classes(model),
            "reshard_after_forward": True,
            "activation_checkpointing": activation_checkpointing,
            "state_dict_type": "FULL_STATE_DICT",
            "cpu_ram_efficient_loading": False,
        },
    }


def set_fsdp_mixed_precision(training_args, bf16: bool) -> None:
    """bf16 compute, float32 gradient reduction (Accelerate's default reduces in bf16: LoRA gradients summed over
    many ranks lose bits), outputs left as computed. 4-bit weights are stored in bf16 already, so their cast is a
    no-op. Without bf16 everything stays float32 (no policy)."""
    if training_args.fsdp_plugin_args is None or not bf16:
        return
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    training_args.fsdp_plugin_args["mixed_precision_policy"] = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32
    )


def enable_fsdp_on_cpu(trainer) -> None:
    """Accelerate 1.15 switches to its FSDP mode only on accelerator devices (AcceleratorState: MULTI_GPU and
    friends); on CPU (MULTI_CPU, gloo) it drops the FSDP plugin silently and trains with DDP. fully_shard itself runs
    on CPU/gloo, so for the CPU tests the state is switched to FSDP here, and everything after (wrapping, mixed
    precision, activation checkpointing, state dicts) is Accelerate's and the Trainer's own code path."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if trainer.args.fsdp_plugin_args is None or state.distributed_type == DistributedType.FSDP:
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"train.distributed: fsdp, but Accelerate chose {state.distributed_type}")
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)  # keeps a policy given in fsdp_plugin_args
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # as AcceleratorState.__init__ does on a GPU: every later AcceleratorState() (AcceleratedOptimizer makes one)
    # copies PartialState's fields over its own
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def full_adapter_state_dict(model) -> dict:
    """The trainable (LoRA) weights of an FSDP2 model, gathered in full, on the CPU, by parameter name. A collective:
    every rank must call it. The frozen base, 4-bit included, is never gathered. With FSDP's activation checkpointing
    the names hold the wrapper's `_checkpoint_wrapped_module.`, as the names of the modules do, which is what
    PeftModel.save_pretrained picks the adapter's entries by; `unwrap_adapter_file` then writes the plain names."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            state[name] = (param.full_tensor() if isinstance(param, DTensor) else param).detach().cpu()
    return state


def unwrap_adapter_file(folder) -> None:
    """Rewrite folder/adapter_model.safetensors with the names a model without checkpoint wrappers has (those of a
    single-process run, which merge and PeftModel.from_pretrained expect)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(folder) / "adapter_model.safetensors"
    with safe_open(path, "pt") as handle:
        if not any(CHECKPOINT_WRAPPER in key for key in handle.keys()):
            return
        metadata = handle.metadata()
        tensors = {key.replace(CHECKPOINT_WRAPPER, ""): handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, path, metadata=metadata)


def sharded_weights(model) -> tuple[int, int]:
    """(bytes of weights this process holds, bytes of the whole model's weights): after FSDP's wrapping the first is
    about the second / world size (unsharded leftovers aside); without FSDP they are equal."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for param in model.parameters():
        size = param.element_size()
        total += param.numel() * size
        held += (param.to_local() if isinstance(param, DTensor) else param).numel() * size
    return held, total


def fsdp_summary(model) -> str:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    held, total = sharded_weights(model)
    checkpointed = sum(isinstance(module, CheckpointWrapper) for module in model.modules())  # FSDPCheckpointWrapper
    processes = plural(world_size(), "process", "processes")
    return (
        f"fsdp over {processes}: rank {os.environ.get('RANK', '0')} holds {held / 2**20:.1f} of "
        f"{total / 2**20:.1f} MiB of weights; {plural(checkpointed, 'decoder layer')} checkpointed by FSDP"
    )
