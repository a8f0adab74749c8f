"""glibc malloc settings for XLA:CPU on Linux: huge pages, two arenas, memory back after each epoch.

XLA:CPU takes its arrays and each call's scratch buffer from malloc. Elsewhere (macOS, Windows,
musl) every function here does nothing.
"""
import ctypes
import os
import sys

HUGE_PAGES = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
M_ARENA_MAX = -8


def restart_with_huge_pages(script):
    """Re-runs `python script ...` once with glibc's malloc on transparent huge pages, where the
    kernel gives them only to memory that asks (THP mode `madvise`, as on Debian and Ubuntu).

    glibc serves blocks above 32 MiB with a fresh mmap each time, such as a call's scratch buffer
    at batch 128 (71 MiB for 5 steps), faulted in 4 KiB at a time: 18,400 page faults per call.
    With 2 MiB pages, `train.py --batch-size 128` epoch 2 took 24.0 s instead of 29.2 s, batch 32
    27.9 s instead of 29.5 s (means of 2 runs, Python 3.13; PERFORMANCE.md). glibc reads its tunables only
    when a process starts, hence the restart: call this before the heavy imports, which it
    repeats. Only a process started as that command restarts: under IPython's %run or runpy it
    would rerun the kernel or the caller. `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` opts out.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    started_as_script = (os.path.abspath(sys.argv[0]) == os.path.abspath(script)
                         and sys.orig_argv[-len(sys.argv):] == sys.argv)
    if not started_as_script or HUGE_PAGES in tunables or not huge_pages_need_a_restart():
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGE_PAGES + "=1"])))
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def huge_pages_need_a_restart():
    """Whether malloc gets huge pages only by asking (THP mode `madvise`) and glibc can ask (2.35+)."""
    return glibc_at_least(2, 35) and "[madvise]" in thp_mode()


def glibc_at_least(major, minor):
    """Whether this process runs on glibc of at least version major.minor."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):  # no os.confstr, no such name, not glibc
        return False
    return name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (major, minor)


def thp_mode():
    """The kernel's transparent huge page line, e.g. 'always [madvise] never'; '' where there is none."""
    try:
        with open(THP_MODE) as f:
            return f.read()
    except OSError:
        return ""


def limit_arenas():
    """At most two malloc arenas, before XLA starts its threads.

    Each thread of XLA's may get an arena of its own, and memory freed in one is not reused by the
    others: two arenas cut the peak of 3 epochs from 624 to 526 MB, for epochs about 3% slower.
    """
    glibc("mallopt", M_ARENA_MAX, 2)


def release_free_memory():
    """Hands the memory malloc holds free back to the system: after each epoch, 3 epochs peaked at
    528 MB instead of 588 (Python 3.13, JAX 0.11.2), epochs as fast."""
    glibc("malloc_trim", 0)


def glibc(function, *args):
    """Calls a function of glibc's on Linux; does nothing elsewhere or without it."""
    if sys.platform == "linux" and hasattr(libc := ctypes.CDLL(None), function):
        getattr(libc, function)(*args)
