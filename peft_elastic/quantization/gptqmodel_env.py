"""gptqmodel without its side effects on the caller's process: its output kept out unless asked, its environment
variables undone.

Importing gptqmodel (7.6) prints a banner and sets process-wide environment variables for its own preferences
(`GPTQMODEL_ENV`: `PYTORCH_ALLOC_CONF`, `CUDA_DEVICE_ORDER`, and the Hugging Face cache folders that tokenicer,
which it imports, points at `/tmp/tokenicer_hf_home`); quantizing prints thousands of log and progress lines
(7,187 for SmolLM2-135M). `import_gptqmodel` imports it with those variables restored afterwards, and `quieted`
keeps what gptqmodel (and transformers, while it works for gptqmodel) prints out of stdout and stderr.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

#: Environment variables that importing gptqmodel 7.6 sets or deletes in the caller's process: its CUDA allocator
#: and device-order preferences (`gptqmodel.models.auto`), `ROCR_VISIBLE_DEVICES` (deleted when
#: `CUDA_VISIBLE_DEVICES` is set too), and tokenicer's Hugging Face cache folders (`tokenicer/__init__.py`).
GPTQMODEL_ENV = (
    "PYTORCH_ALLOC_CONF",
    "CUDA_DEVICE_ORDER",
    "ROCR_VISIBLE_DEVICES",
    "HF_HOME",
    "HF_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_MODULES_CACHE",
)
#: The logger gptqmodel logs through (LogBar's shared logger).
GPTQMODEL_LOGGER = "logbar"
#: How many of the last lines of the output `quieted` kept out are attached to an error raised in its block.
ERROR_TAIL_LINES = 20


@contextlib.contextmanager
def restored_environment(names=GPTQMODEL_ENV):
    """Run the block, then give each environment variable of `names` its value from before the block (unset ones
    are removed again)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def quieted(verbose: bool = False):
    """Unless `verbose`, keep what is printed while the block runs out of stdout and stderr: gptqmodel's banner, logs
    and progress bars, log records of every logger up to WARNING, Python warnings and transformers' progress bars.
    An error raised in the block carries the last `ERROR_TAIL_LINES` lines of that output as a note. Process-wide
    while it runs (sys.stdout/sys.stderr, `logging.disable`): output of other threads is kept out too. With
    `verbose`, gptqmodel's INFO logs are shown in the block even after `quiet_gptqmodel_logs`."""
    if verbose:
        logger = logging.getLogger(GPTQMODEL_LOGGER)
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.setLevel(level)
        return
    from transformers.utils import logging as hf_logging

    output = io.StringIO()
    bars = hf_logging.is_progress_bar_enabled()
    disabled = logging.root.manager.disable
    hf_logging.disable_progress_bar()
    logging.disable(max(disabled, logging.WARNING))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            warnings.simplefilter("ignore")
            yield
    except Exception as error:
        tail = output.getvalue().splitlines()[-ERROR_TAIL_LINES:]
        if tail and hasattr(error, "add_note"):  # Python 3.11+
            error.add_note("gptqmodel's last output (pass verbose=True for all of it):\n" + "\n".join(tail))
        raise
    finally:
        logging.disable(disabled)
        if bars:
            hf_logging.enable_progress_bar()


def import_gptqmodel(verbose: bool = False):
    """The `gptqmodel` module, imported without its banner and import logs unless `verbose`, and with the environment
    variables it sets (`GPTQMODEL_ENV`) given back their values from before the import. (Once imported, in this
    process or by transformers loading a GPTQ checkpoint, it is only returned.)"""
    if "gptqmodel" in sys.modules:
        return sys.modules["gptqmodel"]
    with restored_environment(), quieted(verbose):
        import gptqmodel
    return gptqmodel


def release_gptqmodel_threads() -> bool:
    """Stop the worker threads of gptqmodel's device thread pool (it builds them again, lazily, when next needed);
    returns whether there were any.

    Each worker runs torch operations (a warm-up, calibration, packing, loading) and so owns an OpenMP thread team of
    its own, which outlives the work while the worker waits for more. With more OpenMP threads alive than CPU cores,
    libgomp stops spinning between parallel regions and puts its threads to sleep, and every later parallel region of
    the process pays a wake-up: on 2 cores the demo's fine-tuning after `quantize_gptq` ran at 0.6x its speed (LoRA's
    150 steps in 24.6 s instead of 14.9 s with two such idle threads alive, 281,754 voluntary context switches instead
    of 449; 13.6 s again once they exited: benchmarks/RESULTS.md, the demo section)."""
    gptqmodel = sys.modules.get("gptqmodel")
    pool = getattr(gptqmodel, "_DEVICE_THREAD_POOL", None)
    if pool is None:
        return False
    pool.shutdown(wait=True)
    gptqmodel._DEVICE_THREAD_POOL = None  # `get_device_thread_pool()` builds a new one on demand
    return True


def quiet_gptqmodel_logs() -> None:
    """Show only errors of gptqmodel's logger (LogBar's shared logger) from now on, for a whole process such as the
    command line's (its progress bars are not log records: wrap the work in `quieted` for those)."""
    import_gptqmodel()
    logging.getLogger(GPTQMODEL_LOGGER).setLevel(logging.ERROR)


__all__ = [
    "GPTQMODEL_ENV",
    "GPTQMODEL_LOGGER",
    "import_gptqmodel",
    "quiet_gptqmodel_logs",
    "quieted",
    "release_gptqmodel_threads",
    "restored_environment",
]
