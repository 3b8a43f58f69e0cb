"""The service as a separate process (`safeguard run`), for tests that kill it."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import IO, Any

DEVNULL = asyncio.subprocess.DEVNULL


async def run_service_process(
    config: Path, *, stdout: int | IO[Any] = DEVNULL, stderr: int | IO[Any] = DEVNULL
) -> asyncio.subprocess.Process:
    """`python -m appservice.cli run -c CONFIG`, unbuffered, its output where asked."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "appservice.cli",
        "run",
        "-c",
        str(config),
        stdout=stdout,
        stderr=stderr,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
