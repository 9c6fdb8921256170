"""One dtype policy and no side effects around GPTQ (issue 20, points 2-5), on 50 %-sparse tiny Llamas:

- `quantize_gptq` calibrates in the input's dtype and changes nothing but the quantized layers: the config equals the
  input's field by field but for `quantization_config`, the embeddings, norms and `lm_head` keep the input's dtype,
  and the generation config is the input's file (gptqmodel calibrated a float32 model in bfloat16, stored those
  tensors in bfloat16 and wrote `do_sample: true`);
- a merged QA-SparsePEFT checkpoint keeps the quantization config, `dtype` and tensor dtypes of the checkpoint it was
  trained on, and is no larger (transformers' save pinned `backend: gptq_torch`, wrote GPTQConfig's `damp_percent`
  0.1, dropped `lm_head`/`method`/`pack_dtype`, and stored a bfloat16 checkpoint's tensors in float32);
- `peft-elastic train` trains in float32 whatever an INT4 checkpoint's config says, in bfloat16 with `--bf16`;
- gptqmodel stays quiet unless asked, and the environment variables it sets on import are restored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from gptq_fixtures import CALIBRATION, GROUP_SIZE, TEXTS, load_gptq, sparse_model
from peft import get_peft_model
from safetensors import safe_open
from transformers import GenerationConfig

import peft_elastic
from peft_elastic import SparsePEFTConfig
from peft_elastic.toy import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPTQ_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")
#: a quantize_gptq call with the default verbosity prints fewer lines than this (gptqmodel 7.6 alone: hundreds)
QUIET_LINES = 20
#: bytes a re-saved checkpoint may differ by (the safetensors header's metadata)
SIZE_SLACK = 1024
#: what importing gptqmodel 7.6 sets in the process (tokenicer, which it imports, the HF cache folders), and the
#: worker count quantize_gptq sets for gptqmodel on CPU
ENVIRONMENT = ("PYTORCH_ALLOC_CONF", "CUDA_DEVICE_ORDER", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE",
               "HF_MODULES_CACHE", "GPTQMODEL_CPU_WORKERS")  # fmt: skip


def tensor_dtypes(folder) -> dict[str, str]:
    """`{tensor: safetensors dtype}` of the model files in `folder`."""
    found = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            found |= {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    return found


def read_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def float_model(dtype: torch.dtype):
    """The 50 %-sparse tiny Llama of the GPTQ tests in `dtype`, with a generation config of its own."""
    model = sparse_model().to(dtype)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=12)
    return model


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    """`{dtype name: (float checkpoint folder, INT4 folder, report)}`: a float32 model quantized from its folder,
    a bfloat16 one from the model object (its folder saved only to compare with)."""
    made = {}
    for dtype in (torch.float32, torch.bfloat16):
        root = tmp_path_factory.mktemp(f"policy_{dtype}".replace("torch.", ""))
        model = float_model(dtype)
        model.save_pretrained(root / "float")
        tokenizer.save_pretrained(root / "float")
        source = root / "float" if dtype == torch.float32 else model
        report = peft_elastic.quantize_gptq(
            source, root / "int4", CALIBRATION, bits=4, group_size=GROUP_SIZE, tokenizer=tokenizer
        )
        made[str(dtype).removeprefix("torch.")] = root / "float", root / "int4", report
    return made


# ------------------------------------------------------------------------- quantize_gptq changes nothing else


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_gptq_keeps_the_input_dtype_config_and_generation_config(checkpoints, dtype):
    source, int4, report = checkpoints[dtype]
    assert report.dtype == dtype and f"calibrated in {dtype}" in str(report)
    assert json.loads((int4 / "quantization_report.json").read_text())["dtype"] == dtype
    before, after = read_config(source), read_config(int4)
    assert {k: v for k, v in after.items() if k != "quantization_config"} == before  # dtype included
    quantization = after["quantization_config"]
    assert {k: v for k, v in quantization.items() if k != "meta"} == {
        "bits": 4,
        "group_size": GROUP_SIZE,
        "sym": False,
        "desc_act": False,
        "format": report.checkpoint_format,
        "checkpoint_format": report.checkpoint_format,
        "lm_head": False,
        "method": "gptq",
        "pack_dtype": "int32",
        "quant_method": "gptq",
    }
    assert quantization["meta"]["damp_percent"] == 0.05 and "backend" not in quantization
    # every tensor that is not quantized is stored as in the input (embeddings, norms, lm_head)
    label = {"float32": "F32", "bfloat16": "BF16"}[dtype]
    stored, original = tensor_dtypes(int4), tensor_dtypes(source)
    kept = {k: v for k, v in stored.items() if not k.endswith(GPTQ_PARTS)}
    assert len(kept) == 7 and kept == {k: original[k] for k in kept} and set(kept.values()) == {label}
    # the generation config is the input's: greedy, as before (gptqmodel wrote do_sample: true)
    assert (int4 / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    generation = GenerationConfig.from_pretrained(int4)
    assert not generation.do_sample and generation.max_new_tokens == 12  # unset: greedy


def test_a_dtype_gptqmodel_does_not_calibrate_in_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError) as error:
        peft_elastic.quantize_gptq(
            tiny_llama().double(), tmp_path / "int4", CALIBRATION, group_size=GROUP_SIZE, tokenizer=tokenizer
        )
    assert str(error.value) == (
        "The model is in torch.float64, which gptqmodel does not calibrate in; quantize_gptq calibrates in the "
        "model's dtype: cast it to one of float32, bfloat16, float16 first."
    )
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ a merged QA-SparsePEFT checkpoint


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_qa_checkpoint_keeps_the_quantized_checkpoints_config_dtypes_and_size(checkpoints, dtype, tmp_path):
    """Trained in float32 on `gptq_torch` (the CPU recipe), whatever the checkpoint's dtype."""
    _, int4, _ = checkpoints[dtype]
    model = get_peft_model(load_gptq(int4), SparsePEFTConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                             quantization_aware=True))  # fmt: skip
    assert model.dtype == torch.float32
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        qa_logits = model(ids).logits
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    before, after = read_config(int4), read_config(tmp_path / "merged")
    assert after["quantization_config"] == before["quantization_config"]  # every field, and no backend added
    assert after == before  # dtype included
    assert tensor_dtypes(tmp_path / "merged") == tensor_dtypes(int4)
    size, merged_size = (int4 / "model.safetensors").stat().st_size, (tmp_path / "merged" / "model.safetensors").stat()
    assert merged_size.st_size <= size + SIZE_SLACK
    # the stored tensors are the ones the QA forward computed with: the reload is exact
    with torch.no_grad():
        assert torch.equal(load_gptq(tmp_path / "merged")(ids).logits, qa_logits)


# ------------------------------------------------------------------------------- the CLI's dtype policy


class Stop(Exception):
    pass


@pytest.mark.parametrize("bf16", [False, True])
def test_cli_trains_an_int4_model_in_float32_unless_bf16(checkpoints, tmp_path, monkeypatch, capsys, bf16):
    """The bfloat16 INT4 checkpoint's config says `dtype: bfloat16`; the CLI trains in float32 (it loaded with
    `dtype="auto"`: bfloat16, ~6.5x slower on SmolLM2 on a CPU without bfloat16 units)."""
    import peft_elastic.training
    from peft_elastic.cli import main

    _, int4, _ = checkpoints["bfloat16"]
    assert read_config(int4)["dtype"] == "bfloat16"
    seen = {}

    class Recording:
        def __init__(self, model, args, **kwargs):
            seen.update(dtype=model.dtype, bf16=args.bf16)
            raise Stop

    monkeypatch.setattr(peft_elastic.training, "ElasticSFTTrainer", Recording)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS[:8]))
    argv = ["train", str(int4), str(tmp_path / "out"), "--dataset", str(data), "--method", "sparse-peft",
            "--quantization-aware", "--quiet"] + (["--bf16"] if bf16 else [])  # fmt: skip
    with pytest.raises(Stop):
        main(argv)
    assert seen == {"dtype": torch.bfloat16 if bf16 else torch.float32, "bf16": bf16}


@pytest.mark.parametrize(("options", "expected"), [([], 2e-3), (["--learning-rate", "5e-4"], 5e-4)])
def test_cli_trains_qa_sparse_peft_at_its_own_default_rate(checkpoints, tmp_path, monkeypatch, options, expected):
    """QA-SparsePEFT at the float adapters' 3e-4 changes almost no INT4 code (docs/quantization.md): the CLI's
    default for --quantization-aware is QA_LEARNING_RATE; a rate given is kept."""
    import peft_elastic.training
    from peft_elastic.cli import main

    _, int4, _ = checkpoints["float32"]
    seen = {}

    class Recording:
        def __init__(self, model, args, **kwargs):
            seen["lr"] = args.learning_rate
            raise Stop

    monkeypatch.setattr(peft_elastic.training, "ElasticSFTTrainer", Recording)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS[:8]))
    argv = ["train", str(int4), str(tmp_path / "out"), "--dataset", str(data), "--method", "sparse-peft",
            "--quantization-aware", "--quiet", *options]  # fmt: skip
    with pytest.raises(Stop):
        main(argv)
    assert seen == {"lr": expected}


def test_cli_refuses_a_learning_rate_that_is_not_positive(capsys):
    from peft_elastic.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "m", "out", "--dataset", "d.jsonl", "--learning-rate", "0"])
    assert exit_info.value.code == 2
    assert "--learning-rate: 0 is not a positive finite number" in capsys.readouterr().err


@pytest.mark.parametrize("bf16", [False, True])
def test_cli_evaluates_an_int4_model_in_float32_unless_bf16(checkpoints, tmp_path, monkeypatch, capsys, bf16):
    """eval (and search, which shares `compute_dtype`) compute in float32 whatever the checkpoint says."""
    import peft_elastic.search
    from peft_elastic.cli import main

    _, int4, _ = checkpoints["bfloat16"]
    seen = {}

    class Recording:
        direction = "minimize"

        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, model):
            seen["dtype"] = model.dtype
            return 1.0

    monkeypatch.setattr(peft_elastic.search, "LossEvaluator", Recording)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS[:4]))
    assert main(["eval", str(int4), "--dataset", str(data), "--quiet"] + (["--bf16"] if bf16 else [])) == 0
    assert seen == {"dtype": torch.bfloat16 if bf16 else torch.float32}
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["value"] == 1.0


def test_cli_trains_on_an_int4_model_quietly(checkpoints, tmp_path, capfd):
    from peft_elastic.cli import main

    _, int4, _ = checkpoints["float32"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS[:8]))
    capfd.readouterr()
    code = main(["train", str(int4), str(tmp_path / "out"), "--dataset", str(data), "--method", "sparse-peft",
                 "--quantization-aware", "--r", "4", "--max-steps", "2", "--batch-size", "4", "--quiet"])  # fmt: skip
    out, err = capfd.readouterr()
    assert code == 0, err
    assert out.splitlines()[-1].startswith(f"{tmp_path / 'out'}: SparsePEFTConfig adapter trained 2 steps")
    # the trainer's log lines and the summary; no gptqmodel log ("INFO  Kernel: selected ...", 7 lines before)
    lines = (out + err).splitlines()
    assert len(lines) < QUIET_LINES and not [line for line in lines if line.startswith(("INFO", "WARN"))], lines


# ------------------------------------------------------------------------------------------------ quiet


def test_quantize_gptq_is_quiet_unless_verbose(tokenizer, tmp_path, capfd):
    model = tiny_llama()
    peft_elastic.sparsify(model, None, "magnitude", 0.5, progress=False)
    options = dict(bits=4, group_size=GROUP_SIZE, tokenizer=tokenizer)
    capfd.readouterr()
    peft_elastic.quantize_gptq(model, tmp_path / "quiet", CALIBRATION, **options)
    quiet = capfd.readouterr()
    peft_elastic.quantize_gptq(model, tmp_path / "verbose", CALIBRATION, verbose=True, **options)
    verbose = capfd.readouterr()
    assert len((quiet.out + quiet.err).splitlines()) < QUIET_LINES, quiet.out + quiet.err
    assert len((verbose.out + verbose.err).splitlines()) > 3 * QUIET_LINES  # capfd does see gptqmodel's output


def test_first_quantize_gptq_of_a_process_is_quiet_and_keeps_the_environment(tmp_path):
    """A fresh interpreter, so that gptqmodel is imported by the call (its banner, its environment variables)."""
    script = textwrap.dedent(
        f"""
        import json, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from gptq_fixtures import CALIBRATION, TEXTS
        import peft_elastic
        from peft_elastic.toy import tiny_llama, train_tokenizer

        assert "gptqmodel" not in sys.modules
        names = {ENVIRONMENT!r}
        model, tokenizer = tiny_llama(), train_tokenizer(TEXTS, vocab_size=96)
        before = {{name: os.environ.get(name) for name in names}}
        print("<<<", flush=True); print("<<<", file=sys.stderr, flush=True)
        peft_elastic.quantize_gptq(model, {str(tmp_path / "int4")!r}, CALIBRATION, group_size=32, tokenizer=tokenizer)
        print(">>>", flush=True); print(">>>", file=sys.stderr, flush=True)
        after = {{name: os.environ.get(name) for name in names}}
        print(json.dumps({{"before": before, "after": after, "imported": "gptqmodel" in sys.modules}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    def between(text: str) -> list[str]:
        return text.split("<<<\n", 1)[1].split(">>>\n", 1)[0].splitlines()

    printed = between(done.stdout) + between(done.stderr)
    assert len(printed) < QUIET_LINES, "\n".join(printed)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["imported"] and result["after"] == result["before"]
    assert result["before"]["PYTORCH_ALLOC_CONF"] is None and result["before"]["CUDA_DEVICE_ORDER"] is None


def test_quieted_keeps_output_out_and_attaches_its_tail_to_an_error(capfd):
    from peft_elastic.quantization.gptqmodel_env import GPTQMODEL_ENV, quieted

    assert set(ENVIRONMENT) - set(GPTQMODEL_ENV) == {"GPTQMODEL_CPU_WORKERS"}
    with pytest.raises(RuntimeError) as error, quieted():
        for i in range(30):
            print(f"line {i}")
        raise RuntimeError("boom")
    assert capfd.readouterr().out == ""
    if hasattr(error.value, "add_note"):  # Python 3.11+
        assert error.value.__notes__ == [
            "gptqmodel's last output (pass verbose=True for all of it):\n"
            + "\n".join(f"line {i}" for i in range(10, 30))
        ]
    with quieted(verbose=True):
        print("shown")
    assert capfd.readouterr().out == "shown\n"
