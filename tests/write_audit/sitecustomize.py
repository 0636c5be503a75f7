"""Test harness: with this directory on PYTHONPATH and ``$FGCMR_WRITE_AUDIT`` set, every Python process
records the files it writes, so a multi-rank test can assert that no two ranks write the same file.

Each process appends JSON lines ``{"rank", "pid", "op", "path"}`` to ``$FGCMR_WRITE_AUDIT/<pid>.jsonl``:
files opened for writing (``open``, ``os.open``: Python's audit events), rename targets (``os.replace``),
removals, and the paths given to ``torch.save`` (written from C++, invisible to audit hooks). The rank
is the launcher's (``RANK`` or ``SLURM_PROCID``), read when the write happens.
"""

import json
import os
import sys

_DIR = os.environ.get("FGCMR_WRITE_AUDIT")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_state = {"busy": False, "fd": None, "pid": None, "torch": False}


def _emit(op, path):
    if isinstance(path, int) or path is None:
        return
    _state["busy"] = True
    try:
        if _state["pid"] != os.getpid():  # first write, or a forked DataLoader worker
            _state["pid"] = os.getpid()
            _state["fd"] = os.open(
                os.path.join(_DIR, f"{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
            )
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "?"
        record = {"rank": rank, "pid": os.getpid(), "op": op, "path": os.path.abspath(os.fsdecode(os.fspath(path)))}
        os.write(_state["fd"], (json.dumps(record) + "\n").encode())
    finally:
        _state["busy"] = False


def _patch_torch():
    torch = sys.modules.get("torch")
    save = getattr(torch, "save", None)
    if save is None or getattr(save, "_audited", False):
        return
    _state["torch"] = True

    def audited_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, bytes, os.PathLike)):
            _emit("torch.save", f)
        return save(obj, f, *args, **kwargs)

    audited_save._audited = True
    torch.save = audited_save


def _hook(event, args):
    if _state["busy"]:
        return
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        if writing:
            _emit("write", path)
    elif event == "os.rename":
        _emit("rename", args[1])
    elif event == "os.remove":
        _emit("remove", args[0])
    elif event == "shutil.rmtree":
        _emit("rmtree", args[0])
    if not _state["torch"] and "torch" in sys.modules:
        _patch_torch()


if _DIR:
    sys.addaudithook(_hook)
