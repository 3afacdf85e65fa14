"""One local training worker: `python -m keiryo.parallel.worker FOLDER`, started by `launch.run_local`.

The launcher writes the work (a function and its arguments: model, loss, data, configs) to FOLDER/payload.pkl,
pickled by value with cloudpickle, and starts one such process per rank (RANK in its environment). The worker
runs keiryo's own module, not the user's script again as multiprocessing's spawn does: a script without an
`if __name__ == "__main__":` guard, `python -c` and a notebook whose model class is defined in a cell all
work, because nothing of the user's __main__ is re-run; what the work needs of it travels by value.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from keiryo.errors import one_line
from keiryo.fileio import atomic_torch_save
from keiryo.parallel.group import teardown
from keiryo.parallel.watch import heartbeat, is_comm_error

LAUNCHER_ENV = "KEIRYO_LAUNCHER"  # the launcher's pid: a worker whose launcher is gone leaves
PAYLOAD = "payload.pkl"


def write_payload(folder: Path, work: bytes, threads: int) -> None:
    """The worker's instructions: the launcher's import path (so that what was pickled by reference imports
    the same way), its thread count, and the work itself (cloudpickle bytes of `(fn, args)`)."""
    payload = {"sys_path": list(sys.path), "threads": threads, "work": work}
    (folder / PAYLOAD).write_bytes(pickle.dumps(payload))


def main(folder: Path) -> None:
    """Beat, run the work, save rank 0's result, or leave this rank's error; then leave with os._exit.

    os._exit once the result is on disk and the group is torn down: the interpreter's own teardown
    (destructors of gloo threads and sockets) is where workers used to abort at random. The payload is read
    from the launcher's private temp folder (mode 0700), which only this user can write.
    """
    rank = int(os.environ["RANK"])
    beat = threading.Thread(target=heartbeat, args=(folder / f"beat-{rank}", int(os.environ[LAUNCHER_ENV])))
    beat.daemon = True
    beat.start()
    try:
        payload = pickle.loads((folder / PAYLOAD).read_bytes())
        sys.path[:] = payload["sys_path"]
        torch.set_num_threads(payload["threads"])
        try:
            fn, args = pickle.loads(payload["work"])
        except Exception as exc:
            raise RuntimeError(
                f"the worker could not rebuild the model, loss or data ({one_line(exc)}); define them in "
                "the script or notebook that calls keiryo, or in a module the worker can import"
            ) from exc
        result = fn(*args)
        if rank == 0:
            atomic_torch_save(result, folder / "result.pt")
        if dist.is_initialized():  # `fn` left the group up: all leave it together
            dist.barrier()
        teardown()
    except BaseException as exc:
        text = json.dumps({"message": one_line(exc), "comm": is_comm_error(exc)})
        (folder / f"error-{rank}.json").write_text(text)
        _exit(1)
    _exit(0)


def _exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
