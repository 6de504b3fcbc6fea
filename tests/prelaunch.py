"""A launcher for the tests whose ranks start with torch, timm, DeepSpeed and the library already imported.

Most of a tiny launched run is start-up: each rank imports torch, timm, torchvision and DeepSpeed (~3 s of the
2-core machine), and the launcher itself imports torch (torchrun ~2 s, the deepspeed launcher ~5 s). This server
imports them once; each job's ranks are forked from it. A job's ranks are still separate processes, one per
rank, with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), running
the script as `python -u SCRIPT ARGS` (or `python -m MODULE ARGS`, `python -c CODE`) would: `__main__` is the
script, they leave through the interpreter's own shutdown (atexit hooks, loader workers joined), and their
output and exit code come back as subprocess.run's. As the launchers do, the first rank to fail gives the
job's exit code and its peers get SIGTERM at once, SIGKILL 30 s later. A job with `dist=False` is a plain
`python SCRIPT` (no launcher's variables).

What it is not: the documented launchers. Tests of those launch for real (conftest's `launch(...,
launcher="deepspeed")`, `torchrun(..., launcher="torchrun")`), and so do tests that signal ranks found by their
command line, run on Slurm or run the demo.

    python tests/prelaunch.py SOCKET       # serve; conftest.py starts one per test session
"""
from __future__ import annotations

import gc
import io
import json
import os
import runpy
import select
import signal
import socket
import sys
import time

PRELOAD = ("torch", "torch.distributed", "timm", "torchvision", "deepspeed", "accelerate", "webdataset",
           "pyarrow", "safetensors.torch", "pretrain.cli.train", "pretrain.training.distributed",
           "pretrain.training.deepspeed_backend", "pretrain.training.accelerate_backend", "pretrain.models",
           "pretrain.weights", "pretrain.cli.convert", "pretrain.cli.release", "pretrain.cli.make_shards", "finetune.run")
# Read when the modules above are imported (here, once): a job may not change them.
IMPORT_TIME_ENV = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONPATH")
GRACE_S = 30  # a failed job's peers: SIGTERM at once, SIGKILL this much later (the deepspeed launcher's wait)


def request(sock_path: str, job: dict) -> dict:
    """Send one job, wait for its result: {"returncode", "stdout", "stderr"}.

    job: argv (SCRIPT ARGS, or -m MODULE ARGS, or -c CODE ARGS), ranks, env (the whole environment), cwd,
    timeout (s), port (the rendezvous), dist (False: no launcher variables)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(job["timeout"] + 2 * GRACE_S)
        s.connect(sock_path)
        s.sendall(json.dumps(job).encode() + b"\n")
        chunks = []
        while chunk := s.recv(1 << 20):
            chunks.append(chunk)
    if not chunks:
        raise RuntimeError(f"the prelaunch server at {sock_path} closed the job without a result: {job['argv']}")
    return json.loads(b"".join(chunks))


def serve(sock_path: str) -> None:
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    # What is imported stays out of every rank's garbage collections (at its exit above all): a collection
    # would touch each object's header and so copy the whole shared heap into the rank (seconds per exit).
    gc.freeze()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path + ".part")
    os.rename(sock_path + ".part", sock_path)  # the socket appears once the imports are done
    server.listen(16)
    print(f"prelaunch: serving on {sock_path}, {len(PRELOAD)} modules imported", flush=True)
    signal.signal(signal.SIGCHLD, lambda *_: reap())
    while True:
        conn, _ = server.accept()
        sys.stdout.flush(), sys.stderr.flush()
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            server.close()
            lead(conn)  # never returns: exits through SystemExit
        conn.close()


def reap() -> None:
    """Collect finished job leaders (no zombies)."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def lead(conn: socket.socket) -> None:
    """One job: fork its ranks, collect their output, wait for them, send the result."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(1 << 16)
        if not chunk:  # the client left before sending a whole job
            sys.exit(0)
        buf += chunk
    job = json.loads(buf)
    changed = [k for k in IMPORT_TIME_ENV if job["env"].get(k) != os.environ.get(k)]
    if changed:
        result = {"returncode": 99, "stdout": "", "stderr": f"prelaunch: the job changes {changed}, which the "
                  "preloaded modules read at import: run it with a real launcher (conftest's launcher=...)\n"}
    else:
        result = run_job(job, conn)
    conn.sendall(json.dumps(result).encode())
    conn.close()
    sys.exit(0)


def run_job(job: dict, conn: socket.socket) -> dict:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pids: list[int] = []
    for rank in range(job["ranks"]):
        pid = os.fork()
        if pid == 0:
            conn.close()
            os.close(out_r), os.close(err_r)
            os.dup2(out_w, 1), os.dup2(err_w, 2)
            os.close(out_w), os.close(err_w)
            os.setpgid(0, 0)  # the rank and its loader workers, signalled together
            run_rank(job, rank)  # never returns
        pids.append(pid)
    os.close(out_w), os.close(err_w)
    streams: dict[int, list[bytes]] = {out_r: [], err_r: []}
    out, err = streams[out_r], streams[err_r]
    codes: dict[int, int] = {}
    failed = 0  # the first rank to fail gives the job's exit code
    kill_at = time.time() + job["timeout"]
    while len(codes) < len(pids):
        read(streams, 0.1)
        for pid in [p for p in pids if p not in codes]:
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] != 0 and not failed:
                failed = codes[pid]
                signal_ranks(pids, signal.SIGTERM)
                kill_at = min(kill_at, time.time() + GRACE_S)
        if time.time() > kill_at:
            signal_ranks(pids, signal.SIGKILL)
            err.append(b"prelaunch: ranks still running were killed (the job's timeout, or a failed peer)\n")
            kill_at = float("inf")
    signal_ranks(pids, signal.SIGKILL)  # what the ranks left running (a worker holding the output open)
    end = time.time() + 5
    while streams and time.time() < end:
        read(streams, 0.1)
    return {"returncode": failed, "stdout": b"".join(out).decode(errors="replace"),
            "stderr": b"".join(err).decode(errors="replace")}


def read(streams: dict[int, list[bytes]], timeout: float) -> None:
    """Whatever the ranks wrote, waiting at most `timeout`; a closed stream leaves `streams`."""
    if not streams:
        time.sleep(timeout)
        return
    for fd in select.select(list(streams), [], [], timeout)[0]:
        data = os.read(fd, 1 << 16)
        if data:
            streams[fd].append(data)
        else:
            os.close(fd)
            del streams[fd]


def signal_ranks(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def run_rank(job: dict, rank: int) -> None:
    """As `python -u SCRIPT ARGS` (`-m MODULE`, `-c CODE`) under torchrun; leaves by SystemExit so that the
    interpreter shuts down as a launched rank's does."""
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    if job.get("dist", True):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job["ranks"]),
                          LOCAL_WORLD_SIZE=str(job["ranks"]), GROUP_RANK="0", ROLE_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["port"]))
    # -u: what a rank printed is there even when it dies by os._exit or a signal
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    sys.stdin = sys.__stdin__ = open(os.devnull)
    code = 0
    try:
        run_main(job["argv"], job["cwd"])
    except SystemExit as e:
        code = e.code
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    raise SystemExit(code)


def run_main(argv: list[str], cwd: str) -> None:
    if argv[0] == "-m":
        sys.argv, sys.path[0] = [argv[1], *argv[2:]], cwd
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
        main = type(sys)("__main__")
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    else:
        script = os.path.abspath(argv[0])
        sys.argv, sys.path[0] = list(argv), os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    serve(sys.argv[1])
