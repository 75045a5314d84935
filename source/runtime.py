"""Device selection, mixed-precision context, seeding and logging, shared by every script."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import sys

import numpy as np
import torch


class DeviceError(RuntimeError):
    """A device asked for that is not there; the message names the fix."""


def select_device(name: str = "auto") -> torch.device:
    """auto picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available here; use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: MPS is not available here; use --device auto or cpu")
    return device


def default_threads() -> int:
    """The cores this process may use (the affinity mask, which containers and taskset set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def set_torch_threads(requested: int) -> int:
    """PyTorch's intra-op threads: `requested` (0 leaves torch's default) but no more than the
    cores this process may use, where extra threads only wait for each other. Returns the
    number in use."""
    if requested:
        torch.set_num_threads(min(requested, default_threads()))
    return torch.get_num_threads()


def autocast_for(device: torch.device, enabled: bool = True, *, cpu: bool = False):
    """A no-argument factory of the autocast context: bf16 on CUDA (no loss scaling needed)
    and on MPS where this torch supports it; full precision on CPU, where bf16 autocast is
    slower than fp32 on most machines, unless `cpu` asks for bf16 there too (tests, CPUs
    with bf16 matrix units)."""
    if enabled and (device.type in ("cuda", "mps") or (cpu and device.type == "cpu")):
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                pass
            return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
        except (RuntimeError, ValueError):
            pass
    return contextlib.nullcontext


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG this project draws from, as plain values and tensors (weights_only-safe)."""
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # Libraries that log every request or file at INFO would drown the progress bar.
    for noisy in ("PIL", "matplotlib", "urllib3", "httpx", "alembic", "mlflow", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
