"""One pipeline stage in a process of its own, forked from a process that has already imported the
stack: a stage starts from a clean heap at no import cost.

Why: stages that run one after another in one process do not get their memory back. A trainer's
freed model, gradients and optimizer state leave the heap fragmented, and glibc, `malloc_trim` and
all, kept 0.8-1.5 GB of it resident when the late stages of the quickstart began (rl, dpo and distill
then peaked at 5.0-5.2 GB in-process against 3.6-4.4 GB each in a fresh process). A plain subprocess per
stage would pay the imports (torch, transformers, trl: about 7.5 s) every time, and `os.fork` of the
pipeline process hangs in the child once OpenMP's thread pool exists. multiprocessing's forkserver
does both right: its server imports the modules below once and never computes, so no OpenMP pool
exists when it forks.

The pipeline process keeps the run directory's lock and the manifest's final word: after each stage
it reloads the manifest that the child wrote. A child whose pipeline process dies (SIGKILL included)
kills itself at once, so no orphan writes a run directory that a rerun has taken over.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import traceback

from . import stages
from .errors import UserError

# What the forkserver imports once; each stage's child starts with these loaded (a module that fails
# to import is skipped by multiprocessing, and the child imports it itself, as it would anyway).
PRELOAD = [
    "torch",
    "transformers",
    "trl",
    "datasets",
    "accelerate",
    "constitutional.pipeline",
    "constitutional.training",
    "constitutional.backends.hf",
]

_ctx = None


class StageFailed(UserError):
    """A stage's own process failed with a bug (its traceback is printed above) or was killed:
    exit 1, like an unexpected error in-process."""

    exit_code = 1


def context():
    global _ctx
    if _ctx is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD + [f"constitutional.stages.{s.module}" for s in stages.STAGES])
        _ctx = ctx
    return _ctx


def _die_with_parent() -> None:
    """Kill this process the moment its parent (the pipeline process) is gone."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _child(conn, target, name: str, cfg, run_path: str, force: bool) -> None:
    _die_with_parent()
    # tqdm's default lock is a multiprocessing semaphore; one left by a killed stage makes the
    # resource tracker warn at exit. One process writes these bars: a thread lock is enough.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    try:
        from .run import RunDir

        summary = target(name, stages.load(name), cfg, RunDir(run_path), force)
        conn.send(("ok", summary))
    except BaseException as e:  # noqa: BLE001 (everything goes back to the pipeline process)
        if not isinstance(e, (UserError, KeyboardInterrupt)):
            traceback.print_exc()
            e = StageFailed(f"stage {name} failed: {type(e).__name__}: {e} (traceback above); rerun the same command to resume")
        try:
            conn.send(("error", e))
        except Exception:  # noqa: BLE001 (an exception that does not pickle)
            conn.send(("error", StageFailed(f"stage {name} failed: {type(e).__name__}: {e}")))
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()


def run_in_process(target, name: str, cfg, run_path: str, force: bool):
    """`target(name, stage module, cfg, RunDir(run_path), force)` (pipeline.run_stage) in a fresh
    process; return what it returns or raise what it raised."""
    ctx = context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, target, name, cfg, run_path, force), name=f"cai-{name}")
    proc.start()
    send.close()
    try:
        try:
            result = recv.recv()
        except EOFError:  # the child died without a word: killed (out of memory?) or crashed hard
            result = None
        proc.join()
    except KeyboardInterrupt:
        # Ctrl-C reached the child too (one process group): let it record the interruption
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        raise
    finally:
        recv.close()
    if result is None:
        print(file=sys.stderr)  # the stage's progress bar was cut off mid-line
        code = proc.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        hint = " (out of memory? lower memory_mb or the batch size)" if code == -signal.SIGKILL else ""
        raise StageFailed(f"stage {name}: its process {how}{hint}; rerun the same command to resume")
    kind, value = result
    if kind == "error":
        raise value
    return value


def stop() -> None:
    """Stop the forkserver, if one was started, and wait for it: its children's resource usage
    (their peak memory among it) then counts towards this process's, so `/usr/bin/time -v cai run`
    reports the largest stage's peak, not the pipeline process's. A later stage starts it again."""
    if _ctx is None:
        return
    from multiprocessing import forkserver

    halt = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)  # CPython's own, used by its tests
    if halt is not None:
        halt()
