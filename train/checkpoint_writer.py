"""The asynchronous checkpoint's writer process, and the save steps it shares with a synchronous save.

Why a process. A background *thread* writing a checkpoint beside training shares the trainer's
GIL: every piece of Python between its system calls (the records, the index, the manifest, the
fsyncs, the rename, retention) waits for the training thread or makes it wait. At the smoke
model's size, where a training step is mostly Python, that contention cost 0.3-0.4 of a
synchronous save (bench/RESULTS.md). A process has its own interpreter.

Followed: PyTorch DCP's process-based async executor (`async_checkpointer_type=PROCESS`, what
torchtitan's `async_with_pinned_mem` mode runs) and Megatron-Core's persistent async checkpoint
worker: one helper process per rank, started once, taking one save at a time. Unlike DCP, the
staged state is neither pickled nor sent: it is the rank file's image (parallel/state.py
`RankImage`) in memory the two processes share (a memfd mapped by both), so the hand-over
copies nothing. The writer imports no torch: it starts in tens of milliseconds and holds a few
megabytes.

The writer process:
- receives jobs as length-prefixed JSON over a Unix socket pair and answers each with one
  reply ({"ok": true} or the error);
- dies with its trainer (PR_SET_PDEATHSIG): a killed rank never leaves a writer behind that
  finishes its save, so a crash during a background write leaves the previous checkpoint the
  newest complete one, as with a thread;
- runs at the trainer's CPU priority. Tried: SCHED_IDLE. Where training keeps every host core
  busy (CPU training with a thread per core), the writer then got no time at all until the
  trainer waited for it, and the save cost 1.35-1.5 of a synchronous one instead of about its
  CPU time (bench/RESULTS.md);
- exits when the socket closes.

Shared with the synchronous save (train/checkpoint.py): `write_rng`, `commit_save`, `purge`.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

from data.durable import StreamWriter, write_file_synced
from data.errors import UserError

from . import checkpoint_dir as ckpt

DELAY_ENV = "MOEFORGE_CHECKPOINT_DELAY_S"  # tests only: the background write starts this much later
RECORD_PREFIX = "records-"  # an asynchronous save's per-rank report to rank 0 (deleted before the manifest)
RECORD_TIMEOUT_S = 600.0  # rank 0 gives a save up when a rank's record has not come by then
ROOT = Path(__file__).resolve().parent.parent  # the directory holding the `train` package


# --------------------------------------------------------------------- steps of a save
def write_image(view, path: Path, crash=None) -> dict:
    """One rank file from its image (`view`: its exact bytes, page-aligned), fsynced; returns the
    record {"size", "sha256"}. Written straight from that memory (O_DIRECT, no staging copy) and
    hashed on this one thread, so that the writer takes at most one host core from training (a
    hashing helper thread shortened the write but then also ran on training's core).
    `crash()` runs halfway (fault injection: killed mid-write)."""
    out = StreamWriter(path, hash_thread=False)
    try:
        if crash is None:
            out.write(view)
        else:
            half = len(view) // 2 - len(view) // 2 % StreamWriter.ALIGN
            out.write(view[:half])
            out.flush_partial()
            crash()
            out.write(view[half:])
    finally:
        record = out.close()
    return record


def write_rng(tmp: Path, rank: int, rng: dict) -> tuple[str, dict]:
    """This rank's RNG file, fsynced: (name, record). `rng`: train/checkpoint.py `rng_state()`,
    packed or not (the file holds the unpacked form)."""
    if isinstance(rng.get("torch"), str):
        rng = {**rng, "torch": list(bytes.fromhex(rng["torch"])), "cuda": [list(bytes.fromhex(c)) for c in rng["cuda"]]}
    return ckpt.write_small_file(tmp / f"rank-{rank:05d}.json", json.dumps(rng).encode())


def commit_save(tmp: Path, final: Path, step: int, gathered: list, trainer: dict, keep: int,
                crash_point) -> list[Path]:
    """Rank 0: the index, trainer.json and manifest, the rename into place, the pointer, and
    retention's renames. `gathered`: every rank's (state file, index rows, shapes, file records).
    Returns the retired checkpoints for the caller to delete (`purge`)."""
    shapes, records, files = {}, {}, {}
    for fname, rows, sh, rec in gathered:
        shapes.update(sh)
        records.update(rec)
        files[fname] = rows
    records.update([ckpt.write_index(tmp / ckpt.INDEX, shapes, files),
                    ckpt.write_small_file(tmp / "trainer.json", json.dumps(trainer, indent=1).encode())])
    ckpt.write_manifest(tmp, records, step)
    crash_point("manifest")
    ckpt.commit(tmp, final)
    crash_point("renamed")
    ckpt.update_pointer(final.parent, final.name)
    return ckpt.retain(final.parent, keep, delete=False)


def purge(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def post_record(tmp: Path, rank: int, fname: str, rows: list, shapes: dict, records: dict) -> None:
    """A rank's report to rank 0 (the all-gather of a synchronous save, through the directory)."""
    record = tmp / f"{RECORD_PREFIX}{rank:05d}.json"
    part = record.with_name(record.name + ".part")
    write_file_synced(part, json.dumps([fname, rows, {k: list(v) for k, v in shapes.items()}, records]).encode())
    os.replace(part, record)  # rank 0 never reads a partial record


def collect_records(tmp: Path, world: int, aborted) -> list:
    """Rank 0: every rank's record (deleted once read: not part of the checkpoint)."""
    paths = [tmp / f"{RECORD_PREFIX}{r:05d}.json" for r in range(world)]
    deadline = time.monotonic() + RECORD_TIMEOUT_S
    while not all(p.is_file() for p in paths):
        if aborted() or time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.is_file()]
            raise ckpt.CheckpointError(f"{tmp}: save abandoned, no record from {', '.join(missing[:4])}")
        time.sleep(0.02)
    gathered = [json.loads(p.read_text()) for p in paths]
    for p in paths:
        p.unlink()
    return gathered


# --------------------------------------------------------------------- the socket's messages
def send(sock: socket.socket, obj) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("<Q", len(data)) + data)


def _read(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            return None
        buf += got
    return bytes(buf)


def receive(sock: socket.socket):
    """The next message; None when the other side has closed."""
    head = _read(sock, 8)
    if head is None:
        return None
    body = _read(sock, struct.unpack("<Q", head)[0])
    return None if body is None else json.loads(body)


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


# --------------------------------------------------------------------- the trainer's side
class WriterProcess:
    """A rank's writer process, reading the image behind `image_fd` (the trainer's side)."""

    def __init__(self, image_fd: int):
        mine, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "train.checkpoint_writer", str(theirs.fileno()), str(image_fd), str(os.getpid())],
            pass_fds=(theirs.fileno(), image_fd), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock, self.image_fd, self.busy = mine, image_fd, False
        self._layout: tuple = (None, None)  # the index rows and shapes the writer holds

    def submit(self, job: dict) -> None:
        assert not self.busy, "one save in flight at a time"
        if job["rows"] is self._layout[0] and job["shapes"] == self._layout[1]:
            job = {**job, "rows": None, "shapes": None}  # as last time: the writer keeps them
        else:
            self._layout = (job["rows"], job["shapes"])
        send(self.sock, job)
        self.busy = True

    def done(self) -> bool:
        """Whether the save in flight (if any) has answered (without waiting)."""
        return not self.busy or readable(self.sock)

    def abort(self) -> None:
        """Rank 0's writer stops waiting for missing records (other ranks may never send them)."""
        if self.busy:
            try:
                send(self.sock, {"op": "abort"})
            except OSError:
                pass

    def result(self) -> None:
        """Wait for the save in flight; raise its error here."""
        if not self.busy:
            return
        self.busy = False
        try:
            reply = receive(self.sock)
        except OSError:
            reply = None
        if reply is None:
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = "running"
            raise ckpt.CheckpointError(f"the checkpoint writer process stopped during a save (exit code {code})")
        if "error" in reply:
            raise ckpt.CheckpointError(reply["error"]) if reply["user"] else RuntimeError(reply["error"])

    def stop(self) -> None:
        try:  # the writer exits at the end of its input (shutdown: also where a fork holds a copy)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------- the writer's side
def _die_with_parent(parent: int) -> None:
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the end of the socket still stops the writer between saves
    if os.getppid() != parent:  # the trainer died before the prctl took effect
        os._exit(1)


def run_save(job: dict, image, aborted, parent: int) -> None:
    """One asynchronous save of this rank: its files, its record, and on rank 0 the commit."""
    kills = set(job["kill"])

    def crash_point(phase: str) -> None:
        if phase in kills:  # fault injection: the rank dies here (the trainer first, then its writer)
            os.kill(parent, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    delay = float(os.environ.get(DELAY_ENV, "0") or 0)  # tests: a slow filesystem
    if delay:
        time.sleep(delay)
    tmp, rank = Path(job["tmp"]), job["rank"]
    state = tmp / f"state-{rank:05d}.safetensors"
    record = write_image(memoryview(image)[:job["size"]], state,
                         crash=(lambda: crash_point("writing")) if "writing" in kills else None)
    rng_name, rng_record = write_rng(tmp, rank, job["rng"])
    post_record(tmp, rank, state.name, job["rows"], job["shapes"], {state.name: record, rng_name: rng_record})
    crash_point("shards")
    if rank == 0:
        gathered = collect_records(tmp, job["world"], aborted)
        purge(commit_save(tmp, Path(job["final"]), job["step"], gathered, job["trainer"], job["keep"], crash_point))


def main(argv: list[str]) -> int:
    import mmap

    sock_fd, image_fd, parent = (int(a) for a in argv)
    _die_with_parent(parent)
    sock = socket.socket(fileno=sock_fd)
    image = mmap.mmap(image_fd, 0, prot=mmap.PROT_READ)
    os.close(image_fd)
    abort, layout = [], (None, None)

    def aborted() -> bool:  # rank 0 waiting for records: has the trainer given the save up?
        while not abort and readable(sock):
            msg = receive(sock)
            if msg is None or msg.get("op") == "abort":
                abort.append(True)
        return bool(abort)

    while True:
        job = receive(sock)
        if job is None:
            return 0
        if job.get("op") != "save":
            continue  # an abort that came after its save had finished
        if job["rows"] is None:  # the same layout as the previous save
            job.update(rows=layout[0], shapes=layout[1])
        layout = (job["rows"], job["shapes"])
        abort.clear()
        try:
            run_save(job, image, aborted, parent)
            reply = {"ok": True}
        except BaseException as exc:  # noqa: BLE001 - reported to the trainer, which raises it
            user = isinstance(exc, (UserError, OSError))
            if not user:
                traceback.print_exc()
            reply = {"error": f"checkpoint save of step {job['step']} failed: {exc}", "user": user}
        try:
            send(sock, reply)
        except OSError:
            return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
