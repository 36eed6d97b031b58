"""allocator.keep_freed_memory: a freed block stays in malloc's heap and is reused; the command sets it first.

The allocation checks run in child processes with a clean environment: the setting is process-wide, and a parent's
MALLOC_*_ / GLIBC_TUNABLES / LD_PRELOAD would change what they measure.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from wprlhf import allocator, cli

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# mallinfo2 (glibc >= 2.33): `hblkhd` is the bytes malloc holds in blocks mapped on their own, `arena` its heap.
# A 64 MB tensor is such a block under glibc's defaults, unmapped when freed; with the setting it comes from the
# heap, and the heap keeps it when freed. Then a 60 MB tensor, cut from the freed block, faults in no fresh pages
# (slightly smaller: an aligned block of the same size may not fit the freed one exactly). Counting bytes, not page
# faults, for the two settings' difference: transparent huge pages change fault counts, not these.
REALLOCATE = """
import ctypes, json, resource, sys, torch
from wprlhf.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
took = keep_freed_memory() if sys.argv[1] == "1" else False
heap_before = libc.mallinfo2().arena
x = torch.ones(16_000_000)
mapped_apart = libc.mallinfo2().hblkhd
del x
heap_kept = libc.mallinfo2().arena - heap_before
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(15_000_000)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"took": took, "mapped_apart": mapped_apart, "heap_kept": heap_kept, "faults": faults}))
"""
MB = 1_000_000


def reallocation(setting: str, **env) -> dict:
    import json

    keep = ("PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV")  # nothing that changes malloc
    clean = {k: v for k, v in os.environ.items() if k in keep}
    out = subprocess.run([sys.executable, "-c", REALLOCATE, setting], capture_output=True, text=True, check=True,
                         env={**clean, **env})  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def has_mallinfo2() -> bool:
    import ctypes

    return GLIBC and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")


@pytest.mark.skipif(not has_mallinfo2(), reason="the setting is glibc malloc's (the check reads glibc >= 2.33's mallinfo2)")
def test_a_freed_block_stays_in_the_heap_and_is_reused():
    kept = reallocation("1")
    assert kept["took"] is True
    assert kept["mapped_apart"] < 16 * MB  # the 64 MB tensor came from the heap
    assert kept["heap_kept"] >= 64 * MB  # ... which kept it when it was freed
    assert kept["faults"] < 1_000  # the next tensor reused its pages
    default = reallocation("0")  # malloc left alone: the tensor is a mapping of its own, unmapped when freed
    assert default["took"] is False and default["mapped_apart"] >= 64 * MB and default["heap_kept"] < 16 * MB


@pytest.mark.skipif(not has_mallinfo2(), reason="the setting is glibc malloc's")
@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_the_environment_can_leave_malloc_alone(value):
    left = reallocation("1", WPRLHF_KEEP_FREED_MEMORY=value)
    assert left["took"] is False and left["mapped_apart"] >= 64 * MB


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))  # musl: no glibc version
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: pytest.fail("mallopt must not be called"))
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False


def test_the_command_sets_it_before_its_work_and_not_for_the_page_or_the_report(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("set"))
    monkeypatch.setattr(cli, "cmd_sample", lambda args: calls.append("work"))
    monkeypatch.setattr(cli, "cmd_report", lambda args: calls.append("report"))
    assert cli.main(["sample", "--out", str(tmp_path / "s.jsonl")]) == 0
    assert calls == ["set", "work"]
    calls.clear()
    assert cli.main(["report", str(tmp_path)]) == 0
    assert calls == ["report"]
