"""The asynchronous checkpoint's snapshot: a rank file's image in memory another process maps.

`RankImage` lays out a rank file exactly as parallel/state.py `write_rank_file` writes it and
copies the fragments into it; train/checkpoint_writer.py's process writes it to disk. Split from
parallel/state.py, which addresses, writes and reads the state.
"""

from __future__ import annotations

import mmap
import os
import threading
import time

import torch

from data.durable import StreamWriter
from parallel.state import file_layout

SNAPSHOT_DELAY_ENV = "MOEFORGE_SNAPSHOT_DELAY_S"  # tests only: a background snapshot copy starts this much later


class RankImage:
    """A rank file laid out in host memory byte for byte as `write_rank_file` writes it: the
    asynchronous save's snapshot (train/checkpoint.py).

    `prepare` lays the fragments out in it (worked out again only when their names or sizes
    change); `fill` copies them, on a background thread beside the next step's forward and
    backward when given a `then` (the asynchronous save). The memory is a shared mapping of `fd` (a memfd),
    so that the writer process (train/checkpoint_writer.py) reads the same bytes and writes them
    to disk straight from there (page-aligned: O_DIRECT, no staging copy). It is reused from
    save to save; on a GPU machine it is registered with CUDA (pinned), so the device-to-host
    copies run at full speed and asynchronously until the one synchronisation at the end."""

    def __init__(self):
        self._img: torch.Tensor | None = None
        self._map = None  # the mapping behind the image
        self.fd: int | None = None  # the shared memory's file descriptor (the writer maps it)
        self._pinned = False
        self._plan: tuple | None = None  # (signature, rows, destination views, header and data bytes) of the last layout
        self._srcs: list[torch.Tensor] = []  # the prepared fragments' tensors, in file order
        self.rows: list[list] = []
        self.size = 0
        self._filling: threading.Thread | None = None  # a background copy (fill with `then`)
        self._fill_error: BaseException | None = None

    def _buffer(self, size: int) -> torch.Tensor:
        if self._img is None or self._img.numel() < size:
            self.close()
            cap = -(-size // StreamWriter.CHUNK) * StreamWriter.CHUNK
            self.fd = _shared_memory(cap)
            self._map = mmap.mmap(self.fd, cap)  # shared, page-aligned as O_DIRECT wants
            self._img = torch.frombuffer(self._map, dtype=torch.uint8)
            self._pinned = _pin(self._img)
        return self._img

    def close(self) -> None:
        """Release the memory (the writer process keeps its own mapping until it exits)."""
        thread, self._filling = self._filling, None
        if thread is not None:
            thread.join()
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self._img.data_ptr())
        self._img = self._plan = self._map = None
        self._pinned = False
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def prepare(self, frags: list) -> None:
        """The layout of `frags` in the image (rows, size, memory), for the next `fill`: worked out
        again only when the fragments' names or sizes change — from save to save they do not."""
        self.settle()  # a copy in flight writes into the image
        sig = [(kind, name, start, t.numel()) for kind, name, start, t in frags]
        if self._plan is None or self._plan[0] != sig:
            rows, head, order, data_bytes = file_layout(frags)
            img = self._buffer(len(head) + data_bytes)
            img[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
            dsts, off = [], len(head)
            for i in order:
                dsts.append(img.narrow(0, off, 4 * sig[i][3]).view(torch.float32))
                off += 4 * sig[i][3]
            self._plan = (sig, rows, order, dsts, len(head), data_bytes)
        self.rows, self.size = self._plan[1], self._plan[4] + self._plan[5]
        self._srcs = [frags[i][3].detach().reshape(-1) for i in self._plan[2]]

    def fill(self, then=None) -> None:
        """Copy the prepared fragments into the image. Without `then`, on this thread. With `then`,
        on a background thread that calls `then()` once the copy is complete, while this thread
        goes on: the caller must `settle()` before anything changes the fragments' tensors (the
        trainer does right before each optimizer update, so the copy overlaps the next step's
        forward and backward, as torchtitan's staging does). `settle()` also raises an error of
        the copy or of `then`."""
        dsts, srcs, self._srcs = self._plan[3], self._srcs, []

        def copy() -> None:  # one call for many tensors; it releases the GIL
            torch._foreach_copy_(dsts, srcs, non_blocking=self._pinned)

        if then is None:
            copy()
            if self._pinned:
                torch.cuda.synchronize()  # complete before the caller goes on
            return

        def work() -> None:
            try:
                delay = float(os.environ.get(SNAPSHOT_DELAY_ENV, "0") or 0)  # tests: a slow copy
                if delay:
                    time.sleep(delay)
                copy()
                for device in {t.device for t in srcs if t.is_cuda}:  # this thread's current device is not the trainer's
                    torch.cuda.synchronize(device)
                then()
            except BaseException as exc:  # noqa: BLE001 - raised by settle() on the training thread
                self._fill_error = exc

        self._filling = threading.Thread(target=work, name="checkpoint-snapshot", daemon=True)
        self._filling.start()

    def settle(self) -> None:
        """Wait for a background copy (and its `then`); raise its error here."""
        thread, self._filling = self._filling, None
        if thread is not None:
            thread.join()
        err, self._fill_error = self._fill_error, None
        if err is not None:
            raise err

    def copying(self) -> bool:
        return self._filling is not None and self._filling.is_alive()

    def view(self) -> memoryview:
        """The file's bytes (train/checkpoint_writer.py `write_image` writes them)."""
        return memoryview(self._map)[:self.size]


def _shared_memory(size: int) -> int:
    """A file descriptor of `size` bytes of memory another process can map: a memfd (Linux), else an
    unlinked temporary file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("moeforge-checkpoint-image")
    else:
        import tempfile

        fd = os.dup(tempfile.TemporaryFile().fileno())
    os.ftruncate(fd, size)
    return fd


def _pin(img: torch.Tensor) -> bool:
    """Register the image with CUDA (page-locked, so device-to-host copies into it are asynchronous);
    False without CUDA or when the driver refuses (the copies are then synchronous)."""
    if not torch.cuda.is_available():
        return False
    err = torch.cuda.cudart().cudaHostRegister(img.data_ptr(), img.numel(), 0)
    return int(err) == 0
