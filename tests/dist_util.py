"""Run a function on several local processes joined by a process group (gloo
unless told otherwise; 127.0.0.1, a free port), with a timeout: a hang fails
instead of stalling."""
import datetime
import io
import multiprocessing
import os
import socket
import traceback

import torch
import torch.distributed as dist


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, queue, args, backend, pg_timeout):
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        torch.set_num_threads(1)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        result = fn(rank, world, *args)
        buffer = io.BytesIO()  # tensors as plain bytes: no shared memory outliving the child
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(world, fn, *args, timeout=180, backend="gloo", pg_timeout=120, lost=()):
    """fn(rank, world, *args) on `world` processes; returns the results by rank.
    Raises AssertionError with every failing rank's traceback.

    ``pg_timeout`` bounds each collective (seconds); the ranks in ``lost``
    are expected to die without a result (theirs is None)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, queue, args, backend, pg_timeout))
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = dict.fromkeys(lost), []
    try:
        for _ in range(world - len(lost)):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(value))
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    except Exception as e:  # queue.Empty: a rank hung
        errors.append(f"timed out after {timeout} s waiting for the ranks ({e!r})")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
                p.join()
    assert not errors, "\n".join(errors)
    return [results[r] for r in range(world)]
