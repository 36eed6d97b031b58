"""allocator.keep_freed_memory: a freed block is reused without new page faults, and the command sets it first."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from wprlhf import cli

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# A 64 MB tensor, freed, then a 60 MB one: under glibc's defaults each is an mmap of its own, unmapped when freed,
# so the second faults in 15k fresh pages; with the setting, it is cut from the first one's freed block. (Slightly
# smaller: an aligned block of the same size may not fit the freed one exactly.)
REALLOCATE = """
import resource, sys, torch
from wprlhf.allocator import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "1" else False
x = torch.ones(16_000_000)
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(15_000_000)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_a_reallocation(setting: str, env: dict | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", REALLOCATE, setting], capture_output=True, text=True, check=True,
                         env=env)  # fmt: skip
    took, faults = out.stdout.split()
    return took, int(faults)


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc malloc's; elsewhere keep_freed_memory changes nothing")
def test_a_freed_block_is_reused_without_faulting_its_pages_again():
    took, faults = faults_of_a_reallocation("1")
    assert took == "True"
    assert faults < 1_000  # pages already mapped: a handful of faults at most
    took, faults = faults_of_a_reallocation("0")  # malloc left alone: the block is mapped afresh
    assert took == "False" and faults > 10_000


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc malloc's")
def test_the_environment_can_leave_malloc_alone():
    import os

    took, faults = faults_of_a_reallocation("1", {**os.environ, "WPRLHF_KEEP_FREED_MEMORY": "0"})
    assert took == "False" and faults > 10_000


def test_the_command_sets_it_before_its_work(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("set"))
    # A command that fails on its input at once: the setting came first all the same.
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert calls == ["set"]
    assert "missing" in capsys.readouterr().err
