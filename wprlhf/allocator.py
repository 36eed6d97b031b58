"""The process's memory allocator: freed memory kept for reuse instead of handed back to the kernel.

PyTorch allocates CPU tensors with malloc. glibc's malloc gives each large block (above a threshold that starts at
128 KiB) its own mmap and unmaps it when freed, and returns the top of its heap to the kernel once more than twice
that threshold lies free there. A training step frees and reallocates the same gigabytes every minibatch (autocast's
bf16 casts of the weights, the gradients, the (B, Tr, V) logits and their log-softmax), so every step makes the
kernel map and zero fresh pages again: on a 2-core cloud VM, a quarter to a third of a PPO run's CPU time. With
mmap off and trimming off, a freed block goes back to malloc's free lists and the next step reuses it. Measured there
(`benchmarks/RESULTS_amx.md`, SmolLM2, bf16): 17 % more PPO episodes a second (trl's PPO gains 15 % from the same
setting), peak RSS unchanged.

What it covers: blocks of the main thread, where PyTorch's CPU autograd and the sampler allocate, and blocks up to
64 MiB of other threads; glibc still maps a larger block of another thread on its own, and may unmap a thread's
whole arena. The cost: memory a process has freed stays its own until it exits (its high-water mark, which the run
needed anyway). The command leaves it off for `label` and `report`, which run no model. `WPRLHF_KEEP_FREED_MEMORY=0`
(or false, no, off) leaves malloc as it is everywhere.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Set glibc's malloc to serve every block from its heap (M_MMAP_MAX 0) and never trim the heap
    (M_TRIM_THRESHOLD at its largest), for the rest of the process. Call it before the work starts: blocks already
    mapped keep their mapping.

    Returns True where both settings took effect. False, changing nothing, when the environment sets
    WPRLHF_KEEP_FREED_MEMORY to 0 (false, no, off), off Linux, or on a C library other than glibc (musl, macOS,
    Windows: their allocators are not glibc's); False too where glibc's mallopt refused a setting (it accepts both
    in every version since 2.0). The `wprlhf` command calls it before its work; a program that uses the library
    may call it too.
    """
    if os.environ.get("WPRLHF_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # -1 becomes SIZE_MAX inside glibc: no amount of free memory at the heap's top is ever trimmed.
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
