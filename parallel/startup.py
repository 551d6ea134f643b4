"""The startup watchdog: a process that cannot finish initialising says why in one line and exits.

Two waits have no bound of their own, or one long enough to look like a hang:
- a torch-extensions build lock. `torch.utils.cpp_extension` guards each JIT build directory
  (`<extensions dir>/<op>/lock`) with a lock file that waits forever while it exists; a process
  killed mid-build leaves it behind, and every later process that loads that op waits without
  a word. With a shared home directory that is every node of every later job.
- the rendezvous. A rank waits for all others at `MASTER_ADDR:MASTER_PORT` until the
  distributed timeout (600 s by default), silently.

`StartupWatchdog` is a daemon thread armed around initialisation (parallel/engine.py
`init_distributed`). When initialisation has not finished after the timeout it prints one line
`error: …` to stderr naming what this process waits for — the lock file and its age, else the
rendezvous address, the world size and this rank — and ends the process with
`EXIT_STARTUP_TIMEOUT` (`os._exit`: the waiting thread cannot be interrupted). Leaving the
`with` block disarms it.

What it waits for is read from the waiting thread's stack: a thread inside
`torch.utils.file_baton.FileBaton.wait` is waiting on that baton's lock file. Otherwise, while
torch.distributed has no process group yet, it is the rendezvous; after that, a `lock` left in
the extensions directory is named when there is one.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

EXIT_STARTUP_TIMEOUT = 5  # initialisation did not finish within the startup timeout (docs/launch.md)
TIMEOUT_ENV = "MOEFORGE_STARTUP_TIMEOUT_S"  # overrides trainer.startup_timeout_s; 0 = no watchdog
DEFAULT_TIMEOUT_S = 600


def startup_timeout(configured: int = DEFAULT_TIMEOUT_S) -> int:
    """Seconds allowed for initialisation: $MOEFORGE_STARTUP_TIMEOUT_S when set, else `configured`; 0 = unbounded."""
    from data.errors import UserError

    raw = os.environ.get(TIMEOUT_ENV)
    source, value = (TIMEOUT_ENV, raw.strip()) if raw is not None else ("trainer.startup_timeout_s", str(configured))
    if not value.isdigit():
        raise UserError(f"{source}={value}: must be whole seconds >= 0 (0 = no startup watchdog)")
    return int(value)


def extensions_dir() -> Path:
    """Where torch.utils.cpp_extension JIT-builds ops: $TORCH_EXTENSIONS_DIR, else
    `~/.cache/torch_extensions/py<major><minor>_<cpu|cuXY|rocmXY>` (torch's own rule)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accel = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accel = "cu" + torch.version.cuda.replace(".", "")
    else:
        accel = "cpu"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}"
    return Path(get_default_build_root()) / tag


def format_age(seconds: float) -> str:
    """3 s, 14 min, 5.2 h, 3.0 days."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def baton_wait(thread_id: int) -> str | None:
    """The lock file the thread `thread_id` waits on in `FileBaton.wait`, if it does."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "wait" and code.co_filename.endswith("file_baton.py"):
            path = getattr(frame.f_locals.get("self"), "lock_file_path", None)
            if isinstance(path, str):
                return path
        frame = frame.f_back
    return None


def _lock_line(path: str, timeout_s: int) -> str:
    try:
        age = f"{format_age(time.time() - os.stat(path).st_mtime)} old"
    except OSError:
        age = "gone now"
    return (f"error: startup did not finish in {timeout_s} s: waiting for the torch-extensions lock {path} "
            f"({age}), left by a build that was killed; if no build of that op is running, remove the "
            f"file and start again (exit {EXIT_STARTUP_TIMEOUT})")


def _rendezvous_line(timeout_s: int, rank: int, world_size: int) -> str:
    addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    others = [r for r in range(world_size) if r != rank]
    missing = f"rank {others[0]}" if len(others) == 1 else f"some of the other {len(others)} ranks"
    return (f"error: startup did not finish in {timeout_s} s: rank {rank} of {world_size} is waiting at the "
            f"rendezvous {addr} and {missing} did not arrive; check that every rank was started with "
            f"the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE (exit {EXIT_STARTUP_TIMEOUT})")


class StartupWatchdog:
    """`with StartupWatchdog(timeout_s, rank=…, world_size=…): <initialisation>` — see the module docstring."""

    def __init__(self, timeout_s: int, *, rank: int, world_size: int, what: str = "DeepSpeed's communication setup"):
        self.timeout_s, self.rank, self.world_size, self.what = timeout_s, rank, world_size, what
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread_id: int | None = None

    def __enter__(self) -> "StartupWatchdog":
        self.arm()
        return self

    def __exit__(self, *exc) -> None:
        self.disarm()

    def arm(self) -> None:
        if self.timeout_s <= 0:
            return
        self._thread_id = threading.get_ident()
        threading.Thread(target=self._watch, name="moeforge-startup-watchdog", daemon=True).start()

    def disarm(self) -> None:
        with self._lock:
            self._done.set()

    def diagnosis(self) -> str:
        """The one line: what the armed thread waits for now."""
        lock = baton_wait(self._thread_id) if self._thread_id is not None else None
        if lock:
            return _lock_line(lock, self.timeout_s)
        import torch.distributed as dist

        if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            return _rendezvous_line(self.timeout_s, self.rank, self.world_size)
        try:
            stale = sorted(extensions_dir().glob("*/lock"), key=lambda p: p.stat().st_mtime)
        except OSError:
            stale = []
        if stale:
            return _lock_line(str(stale[0]), self.timeout_s)
        return (f"error: startup did not finish in {self.timeout_s} s: rank {self.rank} of {self.world_size} "
                f"is still in {self.what} (exit {EXIT_STARTUP_TIMEOUT})")

    def _watch(self) -> None:
        if self._done.wait(self.timeout_s):
            return
        with self._lock:  # a disarm that won the race keeps the process
            if self._done.is_set():
                return
            try:
                line = self.diagnosis()
            except Exception as exc:  # noqa: BLE001 — the process must end with a line whatever happens here
                line = (f"error: startup did not finish in {self.timeout_s} s (rank {self.rank} of "
                        f"{self.world_size}; {type(exc).__name__} while finding out why) (exit {EXIT_STARTUP_TIMEOUT})")
            # The launcher reads each worker's code here (train/launch.py writes it on a normal exit).
            exit_dir = os.environ.get("MOEFORGE_EXIT_DIR")
            if exit_dir and os.path.isdir(exit_dir):
                try:
                    Path(exit_dir, os.environ.get("RANK", "0")).write_text(f"{EXIT_STARTUP_TIMEOUT}\n")
                except OSError:
                    pass
            try:
                sys.stdout.flush()
            except Exception:  # noqa: BLE001
                pass
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            os._exit(EXIT_STARTUP_TIMEOUT)
