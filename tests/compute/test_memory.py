"""keep_freed_memory: freed blocks come back without page faults, and the CLI applies it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import moekit.compute.memory
from moekit.cli import main

# A 64 MB tensor, freed and allocated again, before and after the setting; minor page
# faults of the second allocation of each pair (first-touch faults, counted by the kernel).
PROBE = textwrap.dedent("""
    import resource, torch
    from moekit.compute.memory import keep_freed_memory
    from moekit.compute.switches import current

    def freed_memory_kept():
        return current().freed_memory_kept

    def faults_of_second_allocation():
        torch.ones(16 * 2**20).sum()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 * 2**20).sum()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    default = faults_of_second_allocation()
    assert not freed_memory_kept()
    assert keep_freed_memory() and freed_memory_kept()
    kept = faults_of_second_allocation()
    print(default, kept)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    default, kept = map(int, out.split())
    pages = 64 * 2**20 // 4096
    assert default > pages // 2, (default, kept)  # fresh pages each time: a fault per page
    assert kept < pages // 10, (default, kept)  # the freed block is reused


def test_cli_commands_apply_it_and_bench_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(moekit.compute.memory, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda"]) == 2
    assert calls == []
    assert main(["bench", "--device", "cuda", "--keep-freed-memory"]) == 2
    assert calls == [1]
    monkeypatch.setenv("MOEKIT_KEEP_FREED_MEMORY", "0")
    assert main(["bench", "--device", "cuda", "--keep-freed-memory"]) == 2
    assert calls == [1]
