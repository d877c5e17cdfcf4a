"""Tear down torch.distributed before the interpreter does, so a finished process exits cleanly.

Issue 11, item 8: a gloo process that ends its script with process groups still alive sometimes
aborts at exit with "terminate called without an active exception" (SIGABRT, exit status -6;
the deepspeed launcher reports 250). A core dump of one such abort (gdb) shows the chain: the
main thread is in `Py_FinalizeEx`; a `pt_gloo_runloop` thread destroys a finished
`AsyncAllreduceWork`, whose tensors still own Python objects (`TensorImpl::decref_pyobject`),
so it takes the GIL; a thread asking for the GIL while Python finalizes is ended by
`PyThread_exit_thread` -> `pthread_exit`, and that forced unwind through a C++ `noexcept`
destructor calls `std::terminate`. It is a race (the worker thread must lag the main thread
past the end of the script), so it shows up under CPU load.

`destroy_process_group()` alone does not end those threads: a group's threads stop only when its
last reference goes, and DeepSpeed keeps its groups in `deepspeed.utils.groups` (dropped by
`deepspeed.comm.destroy_process_group`) and in engines and MoE layers (often in reference cycles,
hence the `gc.collect()`). Some stay alive even then (a tensor's backward hooks, held in C++,
close over the engine: a cycle the garbage collector cannot see; the expert-parallel test
worker ends with 6 groups, 18 gloo threads alive), so `exit_process` ends a finished worker
without interpreter teardown whenever gloo threads survive: nothing is left to run then but
that racy teardown.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
from typing import NoReturn

GLOO_THREAD_NAMES = ("pt_gloo_runloop", "gloo_tcp_loop")


def gloo_threads() -> list[str]:
    """Names of this process's live gloo threads (Linux: /proc/self/task; elsewhere [])."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name in GLOO_THREAD_NAMES:
            names.append(name)
    return names


def shutdown_distributed() -> list[str]:
    """Destroy every process group and let its threads finish while Python is fully alive.

    Call it at the end of a successful run, on every rank, after the objects that hold groups
    (DeepSpeed engines, MoE layers) are out of scope. Not a collective; a no-op when
    torch.distributed is not initialised.

    Returns:
        the gloo threads still alive afterwards (empty when every group was released); a
        non-empty list means something still references a group.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return gloo_threads()
    gc.collect()  # engines and layers in reference cycles still hold their groups
    ds_comm = sys.modules.get("deepspeed.comm")  # only if loaded: then it may hold groups
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # also drops deepspeed.utils.groups' references
    else:
        dist.destroy_process_group()
    gc.collect()
    return gloo_threads()


def exit_process(code: int = 0) -> NoReturn:
    """End a finished distributed worker: tear down its groups, flush, and exit with `code`.

    Call it last, on every rank, after results are written and closed. If gloo threads survive
    `shutdown_distributed` (groups still referenced), the process leaves with `os._exit` after
    flushing stdout, stderr and logging, so the interpreter never finalizes under them;
    otherwise it exits normally.
    """
    leftover = shutdown_distributed()
    if not leftover:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing left to lose
            pass
    os._exit(code)
