"""Named fault points, for testing that a run survives being killed anywhere, and disk-full errors.

The code calls ``point(name)`` at the places where a run can be interrupted with different
consequences (mid-task, a task's last step, after the task's "trained" checkpoint, after a
strategy's task-end work, after the post-task evaluation, inside a checkpoint or results write,
after the task-end checkpoint). Unless an environment variable names that point it does nothing
(one dictionary lookup), so the hooks cost nothing in real runs:

- ``MLLM_CL_KILL_AT=<point>[:<n>]``: SIGKILL this process the n-th time (default 1st) it reaches
  `<point>`, as a crash, OOM kill or pre-emption would: no ``finally`` block, no flush.
- ``MLLM_CL_ENOSPC_AT=<point>[:<n>]``: raise ``OSError(ENOSPC)`` there (a full disk).
- ``MLLM_CL_PAUSE_AT=<point>[:<n>]``: print ``[mllm_cl] paused at <point> (pid N)`` to stderr and
  sleep until killed (to start a second process against a run that is in progress).

Point names: ``step`` (start of every training batch), ``last_step`` (end of a task's last batch),
``task_trained`` (after the checkpoint that holds a task's trained weights, before its end work),
``task_end`` (callbacks' task-end work such as the WiSE-FT merge done, before the module's),
``strategy_end`` (after each strategy's ``on_task_end``, e.g. the LoRA merge), ``evaluated``
(a row's evaluation done, nothing written yet; the base row is the 1st), ``write.<file name>``
(inside an atomic write of that file, e.g. ``write.results.json`` or ``write.last.ckpt``: the
temporary file is complete, the rename has not happened), ``task_done`` (after the task-end
checkpoint), ``curve`` / ``curve_written`` (before scoring an in-task curve point / after writing
it; both come before that step's checkpoint).

`writing(path)` turns a full disk (ENOSPC / EDQUOT, or torch's "file write failed") into a
`DiskFullError` naming the file, which the CLI prints as one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
from collections import Counter

from mllm_cl.errors import MllmClError

ACTIONS = {"MLLM_CL_KILL_AT": "kill", "MLLM_CL_ENOSPC_AT": "enospc", "MLLM_CL_PAUSE_AT": "pause"}
_seen: Counter = Counter()


class DiskFullError(MllmClError):
    """A write failed for lack of space; what was written before is intact."""

    errno = errno.ENOSPC


def _armed(name: str) -> str | None:
    """The action armed at the current visit of `name`, if any (counts every visit)."""
    specs = [(action, os.environ.get(var)) for var, action in ACTIONS.items()]
    specs = [(action, spec) for action, spec in specs if spec]
    if not specs:
        return None
    _seen[name] += 1
    for action, spec in specs:
        target, _, nth = spec.partition(":")
        if target == name and _seen[name] == int(nth or 1):
            return action
    return None


def point(name: str, path: str | None = None) -> None:
    """A named place where a run can be interrupted (see the module docstring)."""
    action = _armed(name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    elif action == "pause":
        print(f"[mllm_cl] paused at {name} (pid {os.getpid()})", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save reports a failed write of its zip writer as a RuntimeError without an errno.
    return isinstance(err, RuntimeError) and "file write failed" in str(err)


@contextlib.contextmanager
def writing(path: str):
    """Raise `DiskFullError` naming `path` when the block fails for lack of space."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        raise DiskFullError(
            f"disk full while writing {path} (No space left on device); the files written before are "
            "intact: free some space, then continue with --ckpt_path last",
        ) from err


def raise_on_every_rank(trainer, error: BaseException | None) -> None:
    """Raise rank 0's `error` (a full disk while it alone wrote a file) on every rank, so that the
    other ranks stop with its one line instead of waiting at their next collective until a timeout.
    A collective under several processes: every rank calls it, with None where nothing failed."""
    text = str(error) if error is not None else None
    if trainer is not None and trainer.world_size > 1:
        text = trainer.strategy.broadcast(text, src=0)
    if error is not None:
        raise error
    if text:
        raise DiskFullError(text)
