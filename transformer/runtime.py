"""Process-level settings that must be in place before the work starts (kept out of the model).

glibc returns every allocation above 32 MB to the kernel, so each training step page-faults its large
activations (the logits alone are ~130 MB) back in: ~15 % of CPU time went to the kernel on our 2-core
machines. Raising the mmap and trim thresholds keeps those pages in the process. glibc reads the setting
only at start-up, so the `transformer` command re-executes itself once with it set.
"""

from __future__ import annotations

import os
import sys

ALLOCATOR_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
_OPT_OUT = "TRANSFORMER_KEEP_ALLOCATOR"  # set to 1 to run under the allocator as it is


def configure_torch(threads: int = 0) -> None:
    """Thread count, and flush-to-zero for denormal floats: values below 1.2e-38 are rounded to zero
    instead of taking the CPU's slow path (tiny softmax probabilities and gradients produce them)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def reexec_with_allocator_tunables() -> None:
    """Re-run this command with GLIBC_TUNABLES set, unless it is already set, opted out, or not glibc."""
    if os.environ.get("GLIBC_TUNABLES") or os.environ.get(_OPT_OUT) or not sys.platform.startswith("linux"):
        return
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    env = {**os.environ, "GLIBC_TUNABLES": ALLOCATOR_TUNABLES, _OPT_OUT: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "transformer.cli", *sys.argv[1:]], env)
