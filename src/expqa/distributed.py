"""Several processes for one `train` stage: DDP through torch.distributed, launched by the stage itself.

`dvc repro train` stays the command. When `train.num_processes` asks for more than one process (0 = one per
visible GPU), the stage re-runs itself under `torch.distributed.run` (torchrun); the HF Trainer (Accelerate
underneath) then wraps the model in DistributedDataParallel, shards the batches and averages gradients. Each
process holds the 4-bit base on its own GPU (`device_map` = LOCAL_RANK). On CPU the same launch uses the gloo
backend, which is how the tests check that 2 processes learn what 1 process does with the same global batch.
Only rank 0 writes files (adapter, metrics, checkpoints' fingerprint, logs). On Linux, torchrun and its workers
die with their parent: a stage killed outright (SIGKILL, the OOM killer) leaves no orphan still training and
writing checkpoints that the next run would resume from.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def inside_launch() -> bool:
    return "LOCAL_RANK" in os.environ


def wanted_processes(num_processes: int) -> int:
    """train.num_processes resolved: 0 = one per visible CUDA device (at least 1)."""
    if num_processes > 0:
        return num_processes
    import torch

    return max(torch.cuda.device_count(), 1)


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


def relaunch(script: str, args: list[str], processes: int) -> int:
    """Run `script args` as `processes` torchrun workers on this machine; return their exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           script, *args]
    print(f"train: launching {processes} processes: {' '.join(cmd[1:])}", flush=True)
    return subprocess.call(cmd, preexec_fn=die_with_parent)
