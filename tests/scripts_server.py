"""Run the project's scripts as a user would, fast: a fork server imports torch and the
project once, then forks one process per script run (tests/conftest.py's ``scripts``
fixture). ``faults=True`` runs a script through LAUNCHER, which injects the faults that
REL_* environment variables ask for (test_reliability.py)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "torchvision", "torchvision.transforms.v2", "numpy", "PIL.Image", "matplotlib",
           "matplotlib.figure", "matplotlib.backends.backend_agg", "tqdm", "distributed", "runs", "engine",
           "predict", "utils", "dataset", "model", "loss", "plots", "evaluate", "darknet_model",
           "classification", "darknet_train", "train", "test", "detect", "detect_txt", "export", "voc_convert")

SERVER = r'''
"""Fork server: import once, then run each script in a forked process (see scripts_server.py)."""
import importlib, json, os, runpy, signal, sys, time, traceback

for name in sys.argv[1].split(","):
    importlib.import_module(name)
channel = os.fdopen(os.dup(1), "w")


def child(req):
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(req["cwd"])
        os.environ.update(req["env"])
        sys.argv = [req["script"], *req["args"]]
        try:
            runpy.run_path(req["script"], run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "start":
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(req)
        channel.write(json.dumps({"pid": pid}) + "\n")
    else:  # wait
        deadline, timed_out = time.monotonic() + req["timeout"], False
        while True:
            done, status = os.waitpid(req["pid"], os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                timed_out = True
                os.kill(req["pid"], signal.SIGKILL)
                _, status = os.waitpid(req["pid"], 0)
                break
            time.sleep(0.005)
        channel.write(json.dumps({"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out}) + "\n")
    channel.flush()
'''

LAUNCHER = r'''
"""Run the script named by argv[1] as __main__, with the faults asked for by REL_* variables."""
import io, os, runpy, signal, sys

import torch

import distributed
import engine
import runs

env = {k: os.environ.get(k, "") for k in ("REL_STOP_AFTER_STEPS", "REL_STOP_SIGNAL", "REL_KILL_IN_SAVE",
                                          "REL_KILL_AFTER_SAVE", "REL_KILL_AFTER_EPOCH", "REL_NAN_AT_BATCH",
                                          "REL_NAN_RANK", "REL_SAVE_INITIAL", "REL_SAVE_FINAL")}
number = lambda key: int(env[key] or 0)
counts = {"steps": 0, "saves": 0, "batches": 0}
real_step, real_save, real_fit, real_torch_save = (engine.optimizer_step, runs.save_checkpoint,
                                                   engine.fit, torch.save)


def optimizer_step(*args, **kwargs):
    real_step(*args, **kwargs)
    counts["steps"] += 1
    if counts["steps"] == number("REL_STOP_AFTER_STEPS"):
        os.kill(os.getpid(), getattr(signal, env["REL_STOP_SIGNAL"] or "SIGTERM"))


def half_a_save(obj, f):
    buffer = io.BytesIO()
    real_torch_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[:len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(obj, path):
    counts["saves"] += 1
    if counts["saves"] == number("REL_KILL_IN_SAVE"):
        torch.save = half_a_save
    real_save(obj, path)
    end_of_epoch = os.path.basename(path) == "last.pt" and "batch" not in obj
    if counts["saves"] == number("REL_KILL_AFTER_SAVE") or (
            end_of_epoch and obj["epoch"] == number("REL_KILL_AFTER_EPOCH")):
        os.kill(os.getpid(), signal.SIGKILL)


def fit(state, step_fn, *args, **kwargs):
    if env["REL_SAVE_INITIAL"]:
        torch.save(distributed.unwrap(state.model).state_dict(), env["REL_SAVE_INITIAL"])

    def step(model, batch, device):
        counts["batches"] += 1
        on_this_rank = env["REL_NAN_RANK"] in ("", os.environ.get("RANK"))
        if counts["batches"] == number("REL_NAN_AT_BATCH") and on_this_rank:
            batch = [batch[0] * float("nan"), *batch[1:]]
        return step_fn(model, batch, device)
    result = real_fit(state, step, *args, **kwargs)
    if env["REL_SAVE_FINAL"]:  # every rank's own weights, to compare them
        torch.save(distributed.unwrap(state.model).state_dict(), f"{env['REL_SAVE_FINAL']}.rank{os.environ.get('RANK', 0)}")
    return result


engine.optimizer_step, runs.save_checkpoint, engine.fit = optimizer_step, save_checkpoint, fit
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


# --------------------------------------------------------------------------- running scripts
@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def shown(self) -> list[str]:
        """stderr as a terminal shows it: tqdm's bars (redrawn with \\r, cleared at the end)
        are overwritten, blank lines dropped."""
        lines = (line.rsplit("\r", 1)[-1] for line in self.stderr.split("\n"))
        return [line.rstrip() for line in lines if line.strip()]

    def __str__(self) -> str:
        return f"exit {self.rc}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-5000:]}"


class Proc:
    def __init__(self, scripts: "Scripts", pid: int, out: Path, err: Path):
        self.scripts, self.pid, self.out, self.err = scripts, pid, out, err

    def alive(self) -> bool:
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 120) -> Result:
        reply = self.scripts.call({"op": "wait", "pid": self.pid, "timeout": timeout})
        # bytes, not read_text(): universal newlines would turn tqdm's \r into line breaks
        result = Result(reply["rc"], *(p.read_bytes().decode(errors="replace") for p in (self.out, self.err)))
        if reply["timed_out"]:
            pytest.fail(f"timed out after {timeout} s: {result}")
        return result


class Scripts:
    """The project's scripts, each run in a process of its own forked from SERVER."""

    def __init__(self, workdir: Path):
        self.workdir, self.count = workdir, 0
        (workdir / "server.py").write_text(SERVER)
        (workdir / "launch.py").write_text(LAUNCHER)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.server = subprocess.Popen([sys.executable, str(workdir / "server.py"), ",".join(PRELOAD)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=env,
                                       text=True)

    def call(self, request: dict) -> dict:
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        if not line:
            pytest.fail(f"the fork server died (exit {self.server.wait()})")
        return json.loads(line)

    def start(self, script: str, *args, env: dict | None = None, faults: bool = False) -> Proc:
        """``python script args`` (through LAUNCHER with ``faults``), cwd the repository."""
        self.count += 1
        out, err = self.workdir / f"{self.count}.out", self.workdir / f"{self.count}.err"
        argv = [str(REPO / script), *map(str, args)]
        target = str(self.workdir / "launch.py") if faults else argv.pop(0)
        reply = self.call({"op": "start", "script": target, "args": argv, "cwd": str(REPO),
                           "env": {k: str(v) for k, v in (env or {}).items()},
                           "stdout": str(out), "stderr": str(err)})
        return Proc(self, reply["pid"], out, err)

    def run(self, script: str, *args, env: dict | None = None, faults: bool = False,
            timeout: float = 120) -> Result:
        return self.start(script, *args, env=env, faults=faults).wait(timeout)

    def close(self) -> None:
        self.server.stdin.close()
        try:
            self.server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.server.kill()


def ok(result: Result) -> Result:
    assert result.rc == 0, str(result)
    return result


def one_line_error(result: Result, *fragments: str) -> str:
    """Exit 2 and exactly one line on stderr (as a terminal shows it), ``error: ...``."""
    assert result.rc == 2, str(result)
    assert "Traceback" not in result.stderr, str(result)
    lines = [line for line in result.shown if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), str(result)
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def hashes(folder: Path) -> dict[str, str]:
    """Every file's hash, but the run folder's lock (runs.RunLock: a killed run leaves its
    own, which the next run takes over and removes)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}
