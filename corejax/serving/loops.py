"""The scheduler threads of this process and the exit hook that ends them before the interpreter finalizes."""

from __future__ import annotations

import atexit
import threading
import time

# Each live scheduler thread and the condition it waits on (a thread outlives its scheduler by up to one
# wait), so that interpreter exit can end the threads first (_end_loops).
LOOPS: dict[threading.Thread, threading.Condition] = {}
EXITING = threading.Event()


@atexit.register
def _end_loops() -> None:
    """Ends every scheduler thread before the interpreter finalizes. Left running, a daemon thread that drops
    the last reference to a JAX array during finalization aborts the process after the script's work is done:
    the array's C++ destructor releases the GIL, taking it back then ends the thread with pthread_exit, and the
    forced unwind through that noexcept destructor calls std::terminate ("FATAL: exception not rethrown"; seen
    in a core dump, about 1 exit in 10 with a cold compilation cache). Each thread finishes the call it is in
    (bounded: 30 s in all) and returns; queued requests stay unfinished."""
    EXITING.set()
    loops = list(LOOPS.items())
    for _, cv in loops:
        with cv:
            cv.notify_all()
    deadline = time.monotonic() + 30
    for thread, _ in loops:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
