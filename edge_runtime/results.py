"""Result files in the contract of the design notes: result.json with device, commit and metrics."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from edge_runtime.atomic import write_text_atomic

_METRIC_NAME = re.compile(r"^[a-z0-9_.+-]+(/[a-z0-9_.+-]+)+$")


def device_description(device: torch.device | str) -> str:
    """'NVIDIA H100 80GB HBM3' on a GPU, 'cpu: <model name>' otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}"


def git_commit() -> str:
    """The checkout's HEAD commit, or 'unknown' outside a repository.

    EDGE_RUNTIME_COMMIT names it where the checkout travels without .git (a leased GPU machine).
    """
    if os.environ.get("EDGE_RUNTIME_COMMIT"):
        return os.environ["EDGE_RUNTIME_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def metric_key(*parts: str) -> str:
    """Join parts into a contract metric name: lower-case, '/'-separated, no spaces."""
    cleaned = [re.sub(r"[^a-z0-9_.+-]+", "-", str(p).lower()).strip("-") for p in parts]
    key = "/".join(cleaned)
    if not _METRIC_NAME.match(key):
        raise ValueError(f"cannot form a metric name from {parts!r}")
    return key


def write_result(out_dir: str | Path, config: Mapping[str, Any], metrics: Mapping[str, float],
                 device: torch.device | str, command: str | None = None) -> Path:
    """Write `result.json` into out_dir atomically and return its path."""
    bad = [k for k, v in metrics.items() if not _METRIC_NAME.match(k) or not math.isfinite(float(v))]
    if bad:
        raise ValueError(f"metrics not in the result contract: {bad}")
    doc = {
        "command": command or "edge-runtime " + " ".join(sys.argv[1:]),
        "config": dict(config),
        "device": device_description(device),
        "git_commit": git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "metrics": {k: float(v) for k, v in sorted(metrics.items())},
    }
    path = Path(out_dir) / "result.json"
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")
    return path


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain monospace table (numbers to 4 decimals) for the terminal and for markdown-ish logs."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in cells)])
