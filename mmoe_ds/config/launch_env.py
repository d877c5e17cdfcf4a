"""What the launcher told the trainer: SLURM's process variables and accelerate's DeepSpeed settings.

Two launchers do not speak torch.distributed's environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), which is all `deepspeed.init_distributed` reads:

- bare `srun python -m mmoe_ds.train ...` (one task per GPU, no torchrun): SLURM sets
  SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS; `map_slurm_env` copies them into RANK /
  LOCAL_RANK / WORLD_SIZE where those are not set already (torchrun, deepspeed and accelerate set
  them, and win). MASTER_ADDR / MASTER_PORT must come from the job script.
- `accelerate launch --use_deepspeed --deepspeed_config_file X.json ...`: accelerate starts the
  processes with torchrun and passes its DeepSpeed settings as ACCELERATE_* variables;
  `deepspeed_config_path` takes the config file from there when `--deepspeed_config` is absent,
  and refuses the accelerate settings this trainer would otherwise silently ignore.

`free_port` is for whoever starts a launcher (the experiment runner, the tests).
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import MutableMapping

from ..errors import ConfigError
from .recipe import ZERO3_UNSUPPORTED

SLURM_TO_TORCH = (("SLURM_PROCID", "RANK"), ("SLURM_LOCALID", "LOCAL_RANK"), ("SLURM_NTASKS", "WORLD_SIZE"))
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT")

# accelerate launch flags that would change the DeepSpeed config; the config file is the one place for them.
ACCELERATE_OVERRIDES = {
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "--zero_stage",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "--gradient_accumulation_steps",
    "ACCELERATE_GRADIENT_CLIPPING": "--gradient_clipping",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "--offload_optimizer_device",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "--offload_param_device",
}


@dataclass(frozen=True)
class SlurmMapping:
    """The result of `map_slurm_env`.

    Attributes:
        filled: the torch.distributed variables set from SLURM's, {name: value} (empty when none).
        problem: a one-line error (with the fix) when the processes cannot rendezvous, else None.
    """

    filled: dict[str, str] = field(default_factory=dict)
    problem: str | None = None


def map_slurm_env(environ: MutableMapping[str, str] = os.environ) -> SlurmMapping:
    """Fill RANK / LOCAL_RANK / WORLD_SIZE from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS.

    Only variables that are not set already are filled, so a launcher's own values (torchrun
    inside srun) always win. Call it before anything reads those variables.

    Args:
        environ: the environment to read and update (os.environ by default).
    Returns:
        a SlurmMapping; its `problem` names the missing MASTER_ADDR / MASTER_PORT when the
        ranks came from SLURM but the rendezvous address did not come from the job script.
    """
    filled = {torch_name: environ[slurm_name] for slurm_name, torch_name in SLURM_TO_TORCH
              if slurm_name in environ and torch_name not in environ}
    environ.update(filled)
    if "RANK" not in filled:
        return SlurmMapping(filled)
    missing = [name for name in RENDEZVOUS if not environ.get(name)]
    problem = None
    if missing:
        problem = (f"started by srun without torchrun (rank from SLURM_PROCID) but {' and '.join(missing)} "
                   f"{'is' if len(missing) == 1 else 'are'} not set; in the job script export "
                   f"MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) and "
                   f"MASTER_PORT=29500 (or use launch/slurm/train.sbatch, which starts torchrun).")
    return SlurmMapping(filled, problem)


def deepspeed_config_path(cli_path: str | None, environ: MutableMapping[str, str] = os.environ) -> str:
    """The DeepSpeed config to use: `--deepspeed_config`, else accelerate's `--deepspeed_config_file`.

    Args:
        cli_path: the trainer's --deepspeed_config (None when not given).
        environ: the environment accelerate launch passed (os.environ by default).
    Returns:
        the path of the DeepSpeed config file.
    Raises:
        ConfigError: no config at all; two different ones; or accelerate settings that the
            config file must hold instead (ZeRO-3 among them: refused as by validate_launch).
    """
    accel_path = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    if environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ConfigError(f"accelerate launch --zero_stage 3: {ZERO3_UNSUPPORTED}")
    if environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        overrides = [flag for name, flag in ACCELERATE_OVERRIDES.items() if environ.get(name)]
        if environ.get("ACCELERATE_MIXED_PRECISION", "no") not in ("no", ""):
            overrides.append("--mixed_precision")
        if overrides:
            raise ConfigError(f"accelerate launch {', '.join(overrides)}: this trainer takes DeepSpeed settings only "
                              f"from the DeepSpeed config file; drop them (flags, or `accelerate config` answers) "
                              f"and set "
                              f"them in the file passed as --deepspeed_config_file (ds_configs/zero1_bf16.json: bf16).")
    if cli_path and accel_path and os.path.realpath(cli_path) != os.path.realpath(accel_path):
        raise ConfigError(f"two DeepSpeed configs: --deepspeed_config {cli_path} and accelerate's "
                          f"--deepspeed_config_file {accel_path}; pass one of them.")
    path = cli_path or accel_path
    if not path:
        raise ConfigError("no DeepSpeed config; pass --deepspeed_config ds_configs/<name>.json "
                          "(or accelerate launch --deepspeed_config_file ds_configs/<name>.json).")
    return path


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and that the kernel does not hand out by itself.

    Asking the kernel for port 0 and passing the number on races: until the worker binds it, the
    kernel may give the same ephemeral port to another process's `bind(0)` or outgoing connection
    (every gloo connection takes one). A port below the ephemeral range is only ever taken by
    someone naming it, so this picks a random one there that binds now.
    """
    low, _ = _ephemeral_range()
    candidates = list(range(20000, low)) if low > 21000 else []
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
