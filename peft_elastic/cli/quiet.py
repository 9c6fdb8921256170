"""Keeping a command's output to its own lines: progress bars off with --quiet, the libraries' warnings, banners
and INFO logs off unless --verbose."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def progress_bars(enabled: bool):
    """datasets' and transformers' progress bars off while the block runs if not `enabled` (then as they were)."""
    import datasets
    from transformers.utils import logging

    if enabled:
        yield
        return
    datasets_on, transformers_on = datasets.is_progress_bar_enabled(), logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            logging.enable_progress_bar()


def quiet_libraries() -> None:
    """For the rest of this process: transformers' and datasets' warnings and gptqmodel's banner and logs off (PEFT
    imports gptqmodel itself when it wraps a model, printing its banner; loading a GPTQ checkpoint logs INFO lines),
    and deepspeed's "Setting accelerator to CPU" line (accelerate imports deepspeed, where installed, on a save)."""
    import datasets
    from transformers.utils import logging as hf_logging

    from .._import_noise import drop_later_import_noise
    from ..quantization.gptqmodel_env import quiet_gptqmodel_logs

    hf_logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    quiet_gptqmodel_logs()
    drop_later_import_noise()
