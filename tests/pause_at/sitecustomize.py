"""Test hook of the kill tests (``tests/kills.py``). With ``FGCMR_TEST_PAUSE_AT=<glob>`` set, a process about
to rename a file onto a path matching the glob (``os.replace``/``os.rename``: every fgcmr writer commits that
way, ``fgcmr.io``; the target's folder resolved) writes ``{"pid", "thread", "target"}`` to
``FGCMR_TEST_PAUSE_MARKER`` and sleeps, so that a test can SIGKILL it exactly there: the bytes written, not yet
in place. Loaded only when this directory is on PYTHONPATH (Python imports ``sitecustomize`` at start-up in
every process, torchrun's ranks included)."""

import os

PATTERN = os.environ.get("FGCMR_TEST_PAUSE_AT")

if PATTERN:
    import fnmatch
    import json
    import threading
    import time

    MARKER = os.environ["FGCMR_TEST_PAUSE_MARKER"]

    def _paused(rename):
        def wrapper(src, dst, *args, **kw):
            path = os.fspath(dst)
            target = os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))
            if fnmatch.fnmatch(target, PATTERN):
                with open(MARKER + ".tmp", "w") as f:
                    json.dump({"pid": os.getpid(), "thread": threading.current_thread().name, "target": target}, f)
                rename(MARKER + ".tmp", MARKER)
                while True:
                    time.sleep(60)
            return rename(src, dst, *args, **kw)

        return wrapper

    os.replace = _paused(os.replace)
    os.rename = _paused(os.rename)
