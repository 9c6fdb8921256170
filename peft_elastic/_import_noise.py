"""Log records that importing PEFT's optional back-ends prints on a CPU machine, none of which a user can act on:
dropped while `peft_elastic` imports them (a filter on exactly these messages of exactly these loggers, removed
afterwards; every other record of these loggers, and everything they log later, passes).

- torchao: "Failed to load .../torchao/_C_*.so" — its CUDA kernels, absent from a CPU-only torch;
- torch.utils._pytree: "<enum ...> is an Enum subclass and is now natively supported by torch.compile" — torchao
  registering its enums the way torch 2.13 deprecates;
- bitsandbytes.backends.cpu.ops: "Failed to load CPU gemm_4bit_forward from kernels-community" — on CPUs with
  AVX512-BF16 it looks for the optional `kernels` package, which would download its kernel from the Hub.

One more comes later, not while `peft_elastic` imports: where deepspeed is installed, accelerate imports it the first
time a model is saved (`save_pretrained` -> `unwrap_model`), and deepspeed logs "Setting accelerator to CPU. If you
have GPU ..." on its own stdout handler on every machine without CUDA. `drop_later_import_noise` drops that one record
for the rest of the process; the CLI does so unless `--verbose`.
"""

from __future__ import annotations

import contextlib
import logging
import re

IMPORT_NOISE = {
    "torchao": re.compile(r"^Failed to load \S*torchao\S*\.so"),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
    "bitsandbytes.backends.cpu.ops": re.compile(r"^Failed to load CPU gemm_4bit_forward from kernels-community"),
}

LATER_IMPORT_NOISE = {"DeepSpeed": re.compile(r"^Setting accelerator to CPU\. If you have GPU")}


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@contextlib.contextmanager
def quiet_import_noise():
    """Within the block, the loggers of `IMPORT_NOISE` drop their known import-time messages."""
    installed = [(logging.getLogger(name), _DropMatching(pattern)) for name, pattern in IMPORT_NOISE.items()]
    for logger, dropper in installed:
        logger.addFilter(dropper)
    try:
        yield
    finally:
        for logger, dropper in installed:
            logger.removeFilter(dropper)


def drop_later_import_noise() -> None:
    """From now on the loggers of `LATER_IMPORT_NOISE` drop their known message (deepspeed's `create_logger` resets
    the level and adds a handler when it imports, but keeps the logger's filters). Calling it again adds nothing."""
    for name, pattern in LATER_IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
