"""The parent side of a variant's worker process: start it, stream its progress, kill it on timeout,
read back what it wrote; and the progress bar's line-per-refresh writer for non-terminals."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from tqdm import tqdm

from .timing import PROGRESS, TICK

LOG_LINES = 25   # log lines shown on the console for a crashed variant


def _child_env(device: str) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.basename(root) not in ("site-packages", "dist-packages"):   # a source checkout: make it importable
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)   # real kernels on the GPU, whatever the caller's shell had
    return env


def run_child(spec: dict, timeout: float, device: str, log_path: str | None, verbose: bool, on_tick=None,
              env: dict | None = None) -> dict:
    """Run one worker (env: extra environment variables); returns {"records", "returncode", "timed_out",
    "tail", "wall_s"}. Its progress lines go to the console (all lines with verbose), its tick lines to
    on_tick(units), the rest to the log."""
    with tempfile.TemporaryDirectory(prefix="braid-bench-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.jsonl")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        # faulthandler: a segfault or abort leaves the Python stack in the log
        cmd = [sys.executable, "-X", "faulthandler", "-m", "braid_backend.bench.runner", spec_path, out_path]
        tail = collections.deque(maxlen=60)
        log = open(log_path, "w") if log_path else None
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env={**_child_env(device), **(env or {})}, start_new_session=True, errors="replace")

        def pump():
            for line in proc.stdout:
                if line.startswith(TICK):
                    if on_tick:
                        try:
                            on_tick(int(line[len(TICK):]))
                        except ValueError:
                            pass
                    continue
                tail.append(line)
                if log:
                    log.write(line)
                    log.flush()
                if verbose or line.startswith(PROGRESS):
                    tqdm.write("  " + line.rstrip("\n"), file=sys.stderr)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False

        def kill():
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # the worker's own session: it and its children only
            except ProcessLookupError:
                pass

        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill()
            rc = proc.wait()
        except BaseException:   # Ctrl-C: the worker is in its own session and would not see it
            kill()
            raise
        reader.join(timeout=10)
        if log:
            log.close()
        records = []
        if os.path.exists(out_path):
            with open(out_path) as f:
                for line in f:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:   # a line cut by the crash
                        pass
        return {"records": records, "returncode": rc, "timed_out": timed_out, "tail": "".join(tail),
                "wall_s": time.perf_counter() - t0}


def _failure_reason(res: dict, timeout: float) -> str:
    if res["timed_out"]:
        return f"timeout after {timeout}s"
    rc = res["returncode"]
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


def log_excerpt(tail: str, n: int = LOG_LINES) -> list[str]:
    """The lines that say why a worker died: from its last progress line (what it was doing) to the end
    (traceback, fatal-error stack, the test aid's message), at most the last n, each cut to 300 chars."""
    lines = [ln.rstrip() for ln in tail.splitlines() if ln.strip()]
    last = max((i for i, ln in enumerate(lines) if ln.startswith(PROGRESS)), default=0)
    lines = lines[last:][-n:]
    return [ln if len(ln) <= 300 else ln[:297] + "..." for ln in lines]


class _BarLines:
    """Where the progress bar goes when stderr is not a terminal (a log file, a pipe, a test): each
    refresh becomes a line of its own, at most one every `every` seconds, plus the last one."""

    def __init__(self, f, every: float):
        self.f, self.every, self.last, self.pending = f, every, -1e9, None
        self.encoding = getattr(f, "encoding", None) or "utf-8"

    def write(self, s: str) -> None:
        s = s.split("\r")[-1].strip() if s.strip() else ""
        if not s:
            return
        self.pending = s
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.finish()

    def flush(self) -> None:
        self.f.flush()

    def finish(self) -> None:
        if self.pending:
            self.f.write(self.pending + "\n")
            self.f.flush()
            self.pending = None


def _units(s: dict) -> int:
    """Progress-bar units of one variant: tokens per sequence of its timed generate() calls (the batch
    sweep, the --ttft-prompts lengths, the --chat call; clamping can make the last two a little smaller,
    the bar is topped up when the variant ends)."""
    n, calls = s["new_tokens"], 1 + s["warmup"] + s["reps"]
    sweep = len(s["batch_sizes"]) * (n + (s["warmup"] + s["reps"]) * (n + 1))
    return sweep + len(s.get("ttft_prompts") or ()) * calls + (s["chat"][1] * calls if s.get("chat") else 0)
