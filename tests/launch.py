"""Running a training script under `accelerate launch` with 2 CPU processes (DDP over gloo), for the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(
    script: str, *args: str, cwd: Path, config: str = "cpu_2proc.yaml", num_processes: int | None = None
) -> subprocess.CompletedProcess:
    """`accelerate launch` `scripts/<script>` with a shipped 2-process CPU config (DDP by default, or
    `fsdp_cpu_2proc.yaml`, ...; `num_processes` overrides its count); returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / config),
        "--main_process_port",
        str(free_port()),
        *(["--num_processes", str(num_processes)] if num_processes else []),
        str(ROOT / "scripts" / script),
        *args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
