"""CPU threads for the engine's own threads: generation and teacher-forced passes run in threads of their own,
on LORA_LENS_CPU_THREADS threads, while every other thread of the process keeps one (app.py sets
OMP_NUM_THREADS=1); loading a model runs on every core."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch

from utils.runtime import nf4_kernel


@contextmanager
def torch_threads(threads: int):
    """This thread's torch CPU work on `threads` threads (0: as it is), the count restored after.

    Only for threads that end with the work, and only for this thread (threads started meanwhile keep the
    default, one in the app: app.py sets OMP_NUM_THREADS=1). libgomp keeps a thread's OpenMP team alive as
    long as the thread, and while two teams are alive in a process on a 2-core machine it stops spinning
    between parallel regions, so every one of a decode step's few hundred small kernels waits for its helper
    threads to wake (measured: 2 threads in a worker thread beside a 2-thread main thread, 34 ms a step; 1
    thread, 22 ms; 2 threads with the main thread at 1, 17 ms).
    """
    if threads <= 0:
        yield
        return
    set_count = nf4_kernel.set_thread_count
    previous = set_count(threads)
    if previous is None:
        # Without the compiled library: torch's own call, which also sets the default of threads started meanwhile.
        set_count, previous = torch.set_num_threads, torch.get_num_threads()
        set_count(threads)
    try:
        yield
    finally:
        set_count(previous)


def in_own_thread(threads: int, work):
    """`work()` in a thread of its own on `threads` torch threads (see torch_threads); its result or error."""
    if threads <= 0:
        return work()
    outcome: dict = {}

    def target():
        try:
            with torch_threads(threads):
                outcome["result"] = work()
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="lora-lens-forward", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def on_every_core(device: str, work):
    """`work()` (loading a model) on every core the process may use. Quantizing to NF4 runs on the CPU both in a
    CPU run and on ZeroGPU (whose server process has no GPU), where OMP_NUM_THREADS=1 (app.py, and Spaces) would
    leave it on one thread: about 0.54 s per 4096 x 4096 weight here, 0.29 s on two threads."""
    cores = usable_cores()
    if str(device).startswith("cpu"):
        # In a thread of its own: its OpenMP team ends with it, so decoding later is not slowed (torch_threads).
        return in_own_thread(cores, work)
    # In the main thread: ZeroGPU records the placement on cuda there only. Nothing decodes on this CPU team.
    previous = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        return work()
    finally:
        torch.set_num_threads(previous)
