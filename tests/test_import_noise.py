"""Importing peft_elastic prints nothing of PEFT's optional back-ends' import-time noise, and hides nothing else."""

from __future__ import annotations

import logging
import subprocess
import sys

from peft_elastic._import_noise import IMPORT_NOISE, quiet_import_noise

SAMPLES = {
    "torchao": "Failed to load /x/site-packages/torchao/_C_cutlass_90a.abi3.so: Could not load this library",
    "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
    "torch.compile as an opaque value type.",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
    "'kernels'.",
}


def test_import_prints_no_backend_noise():
    done = subprocess.run(
        [sys.executable, "-c", "import peft_elastic"], capture_output=True, text=True, timeout=300, check=True
    )
    printed = done.stdout + done.stderr
    assert not [p.pattern for p in IMPORT_NOISE.values() if p.search(printed)], printed
    assert "Failed to load" not in printed, printed


def test_peft_imported_after_us_prints_no_backend_noise_either():
    # `import peft_elastic` is lazy: PEFT's back-ends load when PEFT does, under the finder that registers our tuners
    code = "import peft_elastic; import peft; from peft_elastic import SparsePEFTConfig"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    printed = done.stdout + done.stderr
    assert not [p.pattern for p in IMPORT_NOISE.values() if p.search(printed)], printed


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.name, record.getMessage()))


def test_only_the_known_messages_are_dropped_and_only_while_importing():
    assert set(SAMPLES) == set(IMPORT_NOISE)
    recorder, names = Recorder(), [*SAMPLES, "transformers"]
    for name in names:  # on each logger itself: torch's and transformers' do not propagate to the root
        logging.getLogger(name).addHandler(recorder)
    try:
        with quiet_import_noise():
            for name, message in SAMPLES.items():
                logging.getLogger(name).warning(message)
                logging.getLogger(name).warning("something else went wrong")
            logging.getLogger("transformers").warning(SAMPLES["torchao"])  # another logger: not ours to hide
        assert recorder.seen == [
            *((name, "something else went wrong") for name in SAMPLES),
            ("transformers", SAMPLES["torchao"]),
        ]
        recorder.seen.clear()
        logging.getLogger("torchao").warning(SAMPLES["torchao"])  # after the import: passes
        assert recorder.seen == [("torchao", SAMPLES["torchao"])]
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(recorder)


SAVE_A_MODEL = """
import sys, tempfile
from transformers import LlamaConfig, LlamaForCausalLM
{quiet}
model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
model.save_pretrained(tempfile.mkdtemp())  # accelerate's unwrap_model imports deepspeed where it is installed
print("deepspeed imported:", "deepspeed" in sys.modules)
import logging
logging.getLogger("DeepSpeed").warning("another DeepSpeed record")
"""


def test_deepspeed_cpu_notice_is_dropped_in_quiet_mode_and_only_that():
    """accelerate imports deepspeed on the first save; deepspeed then prints "Setting accelerator to CPU" on stdout.
    The CLI's quiet mode drops that line; without it the line is there (the check can fail), and other DeepSpeed
    records still pass."""
    pytest = __import__("pytest")
    pytest.importorskip("deepspeed")

    def run(quiet: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", SAVE_A_MODEL.format(quiet=quiet)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        assert "deepspeed imported: True" in done.stdout, done.stdout + done.stderr
        return done.stdout + done.stderr

    assert "Setting accelerator to CPU" in run("")
    printed = run("from peft_elastic.cli.quiet import quiet_libraries; quiet_libraries(); quiet_libraries()")
    assert "Setting accelerator to CPU" not in printed, printed
    assert "another DeepSpeed record" in printed, printed
