"""Starting the harness's processes: a :class:`Step` (``python ARGS`` with its log) run by a
:class:`Runner` from the repository root, in the environment of a device (``CUDA_VISIBLE_DEVICES``,
thread counts), its output appended to its log between two timestamped ``===`` lines."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from distill.harness.profiles import ROOT

LOG_NAME = "harness.log"


@dataclass
class Step:
    """One process: ``python ARGS`` logged to ``log``; ``runs`` are the (name, directory) of the
    runs it makes, in job order (one for a local step, a job array's worth for a SLURM sweep);
    ``note`` is added to the reason of a run that failed."""

    name: str
    args: list[str]
    log: Path
    runs: list[tuple[str, Path]] = field(default_factory=list)
    note: str = ""


def exit_reason(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def _now() -> str:
    return datetime.now().isoformat(sep=" ", timespec="milliseconds")


def command_line(args: Sequence[str], env: Mapping[str, str]) -> str:
    """``VAR=value ... python ARGS`` as a shell line."""
    return shlex.join([*(f"{k}={v}" for k, v in env.items()), sys.executable, *args])


@dataclass
class Runner:
    """Starts ``python ARGS`` processes from the repository root, each logged to a file.

    ``echo`` copies the output to the console as well (off when several run at once);
    ``keep_fds`` are inherited by the processes (the results lock).
    """

    dry_run: bool = False
    echo: bool = True
    keep_fds: tuple[int, ...] = ()

    def __call__(
        self, args: Sequence[str], log: Path, env: Mapping[str, str] | None = None, where: str = ""
    ) -> int:
        """Run ``python ARGS`` with ``env`` added to the environment, appending its stdout and
        stderr to ``log`` after a line naming ``where`` (the device); the exit status."""
        env = dict(env or {})
        line = command_line(args, env)
        print("$", line, flush=True)
        if self.dry_run:
            return 0
        log.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1", **env}
        tag = f" [{where}]" if where else ""
        with open(log, "ab") as out:
            out.write(f"\n=== {_now()}{tag} $ {line}\n".encode())
            out.flush()
            code = self._stream([sys.executable, *args], full_env, out)
            out.write(f"=== {_now()}{tag} {exit_reason(code)}\n".encode())
        return code

    def _stream(self, cmd: list[str], env: dict[str, str], out: BinaryIO) -> int:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=self.keep_fds,
        )
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(1 << 16):
            out.write(chunk)
            if self.echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        return proc.wait()
