"""psq's CPU kernels (``psq/native.cpp``): the training step as one autograd operator, and its halves.

They are compiled with the machine's C++ compiler against the installed torch on first use
(about 40 s, once: the build is cached under torch's extension directory, ``TORCH_EXTENSIONS_DIR``
if set, one build per torch version), or ahead with ``python -m psq.native``.  Where they cannot
be built or loaded, psq says why once in the log and runs the same step on torch's own kernels
(:mod:`psq.kernels`); so it does on other devices.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("psq.native")
SOURCE = Path(__file__).with_name("native.cpp")
# OpenMP for at::parallel_for: torch's own libgomp (same soname) is the one that runs it
_FLAGS = ["-O3", "-fopenmp"]

_lock = threading.Lock()
_loaded: dict[str, Any] = {}  # "ops" once built and loaded, "error" once that failed
_enabled = True


def build_directory() -> Path:
    """Where the build lives: a folder per torch version, so an upgrade never loads a stale one."""
    from torch.utils.cpp_extension import get_default_build_root

    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", torch.__version__)
    return Path(get_default_build_root()) / f"psq_native-torch{tag}-py{sys.version_info[0]}{sys.version_info[1]}"


def ops() -> Any | None:
    """``torch.ops.psq_native`` (built and loaded on the first call), or None if it cannot be
    (the reason logged once) or :func:`set_enabled` turned it off."""
    if not _enabled:
        return None
    if "ops" in _loaded or "error" in _loaded:
        return _loaded.get("ops")
    with _lock:
        if not _loaded:
            try:
                _loaded["ops"] = _build()
            except Exception as e:  # no compiler, no headers, a failed load: torch's kernels do the work
                _loaded["error"] = e
                log.warning("psq's CPU kernels are not available (%s); using torch's kernels", _first_line(e))
    return _loaded.get("ops")


def error() -> BaseException | None:
    """Why the kernels could not be built or loaded (None if they were, or were never tried)."""
    return _loaded.get("error")


def set_enabled(enabled: bool) -> bool:
    """Use the kernels (True, the default) or torch's (False: for comparison); returns the
    previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def _build() -> Any:
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("psq_native*.so")):
        log.info("building psq's CPU kernels into %s (once, about 40 s)", directory)
    load(
        name="psq_native",
        sources=[str(SOURCE)],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.psq_native


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def main() -> int:
    """``python -m psq.native``: build the kernels now; exit 1, with the reason, if they cannot be."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if ops() is None:
        print(f"psq's CPU kernels could not be built: {error()}", file=sys.stderr)
        return 1
    print(f"psq's CPU kernels are built in {build_directory()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
