"""llmc.allocator: with large blocks served from their own mappings, freeing them gives the memory back
(with glibc's default, a small live tensor allocated after them pins the freed heap below it).

glibc's mmap threshold starts at 128 KiB and grows as large blocks are freed, so how much the default
retains depends on what the process did before. The baseline therefore starts from the state glibc
reaches after a while (threshold at its 32 MiB maximum, no trimming) and return_large_blocks_to_system
must undo it."""
import subprocess
import sys
import textwrap

import pytest

from llmc.allocator import return_large_blocks_to_system

SCRIPT = textwrap.dedent("""
    import sys, torch
    from llmc.allocator import return_large_blocks_to_system
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    import ctypes, ctypes.util
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    assert mallopt(-3, 32 << 20) and mallopt(-1, 1 << 30)   # M_MMAP_THRESHOLD grown, M_TRIM_THRESHOLD 1 GiB
    if sys.argv[1] == "on":
        assert return_large_blocks_to_system()
    base, keep = rss(), []
    for _ in range(3):
        big = [torch.ones(4 << 20) for _ in range(16)]      # 16 MiB each, 256 MiB a round
        keep.append(torch.ones(256))                         # a small live block above them
        del big
    print((rss() - base) / 2**20)
""")


def retained_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_freed_large_blocks_leave_the_resident_set():
    if not return_large_blocks_to_system():
        pytest.skip("the C library is not glibc: mallopt is not available")
    default, tuned = retained_mib("off"), retained_mib("on")
    if default <= 128:   # the malloc serving this process ignores glibc's mallopt (a preloaded allocator)
        pytest.skip(f"malloc ignores mallopt here: only {default:.0f} MiB retained with a 32 MiB threshold")
    assert tuned < 32, f"{tuned:.0f} MiB of freed 16 MiB blocks stayed resident"
