"""memory.keep_freed_memory: after it, glibc serves a 100 MB block from the heap, not from a
fresh mmap (which the kernel would fault in and zero again on every training step). Each case
runs in its own interpreter, so the policy of the test process is not the one measured.

The measure is glibc's own count of bytes in mmapped blocks (``mallinfo2().hblkhd``), read
around one 100 MB allocation."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LIB = str(Path(__file__).resolve().parents[1] / "lib")

PROBE = r"""
import ctypes, json, sys
sys.path.insert(0, {lib!r})
from linearize.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
set_ = keep_freed_memory() if {call} else None
before = libc.mallinfo2().hblkhd
block = libc.malloc(100 << 20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(block)
print(json.dumps({{"set": set_, "mapped": mapped}}))
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")


def _probe(call: bool, env_extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE.format(lib=LIB, call=call)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_default_glibc_maps_a_large_block():
    # the control: without the policy the block is mmapped (else the next test proves nothing)
    assert _probe(call=False)["mapped"] >= 100 << 20


def test_policy_serves_a_large_block_from_the_heap():
    result = _probe(call=True)
    assert result["set"] is True
    assert result["mapped"] == 0


def test_a_users_malloc_environment_wins():
    # the user set glibc's own default (up to 65536 mmapped blocks): keep_freed_memory leaves it so
    result = _probe(call=True, env_extra={"MALLOC_MMAP_MAX_": "65536"})
    assert result["set"] is False
    assert result["mapped"] >= 100 << 20
