"""Which reduced precisions DeepSpeed's accelerator supports on this machine, and the skip reason
for a test that needs one it does not.

The answer depends on the hardware: DeepSpeed's CPU accelerator reports fp16 only where oneDNN
has fp16 kernels (`torch.ops.mkldnn._is_mkldnn_fp16_supported()`: AVX512-FP16 / AMX-FP16; many
AMD EPYC and older Intel CPUs say no), and `deepspeed.initialize` then refuses an fp16 config
("Type fp16 is not supported on your device."). Tests ask, never assume.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "fp16")


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (e.g. "AMD EPYC 9B14"), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@dataclass(frozen=True)
class DtypeSupport:
    """What DeepSpeed's accelerator says it can train in.

    Attributes:
        accelerator: DeepSpeed's accelerator name ("cpu", "cuda", ...).
        device: the hardware, named for skip messages (CPU model or GPU name).
        fp16, bf16: `get_accelerator().is_fp16_supported()` / `.is_bf16_supported()`.
    """

    accelerator: str
    device: str
    fp16: bool
    bf16: bool

    @classmethod
    def detect(cls) -> DtypeSupport:
        """Ask DeepSpeed's accelerator on this machine (the same check `deepspeed.initialize` makes)."""
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        name = acc.device_name()
        if name == "cpu":
            device = cpu_model()
        elif name == "cuda":
            import torch

            device = torch.cuda.get_device_name()
        else:
            device = name
        return cls(accelerator=name, device=device, fp16=bool(acc.is_fp16_supported()),
                   bf16=bool(acc.is_bf16_supported()))

    def supports(self, precision: str) -> bool:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}.")
        return precision == "fp32" or getattr(self, precision)

    def skip_reason(self, precision: str) -> str | None:
        """None when `precision` runs here, else a one-line reason naming the precision, the
        hardware and the check that said no."""
        if self.supports(precision):
            return None
        hint = (" (on CPU, oneDNN fp16 kernels need AVX512-FP16 or AMX-FP16)" if precision == "fp16" else
                " (on CPU, bf16 needs AVX512-BF16 or AMX-BF16)") if self.accelerator == "cpu" else ""
        return (f"{precision} not supported by DeepSpeed's {self.accelerator} accelerator on {self.device!r}: "
                f"get_accelerator().is_{precision}_supported() is False{hint}")
