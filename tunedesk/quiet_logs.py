"""Dependency log lines that read like a failure of ours but are not, dropped at the source."""

from __future__ import annotations

import logging

# bitsandbytes (0.50), imported on a CPU with AVX512-BF16 (by peft or transformers: training,
# merging, serving adapters), warns that it could not fetch an optional inference kernel from
# the hub. tunedesk never runs that kernel: the trainer turns the 4-bit weight repacking it
# serves off (train/loop.py), and nothing here serves a 4-bit model.
_DROPPED = {"bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",)}


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_dependency_logs() -> None:
    """Filter the lines above out of their loggers (loggers exist before their modules load,
    so this works before the dependency is imported). Idempotent."""
    for name, prefixes in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))
