"""The `peft-elastic` command line: each command equals the library call it wraps, writes its output folder
atomically, and ends bad inputs with one line and exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_elastic import cli
from peft_elastic.cli import main
from peft_elastic.sparsity import sparsify
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer

TEXTS = [p["prompt"] + p["completion"] for p in arithmetic_problems(40, seed=7)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=96)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("model")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calibration.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what the test printed before
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def decoder_linears(model) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }


def test_sparsify_equals_the_library_call(capsys, model_dir, texts_file, tokenizer, tmp_path):
    out = tmp_path / "sparse"
    code, stdout, stderr = run(
        capsys, "sparsify", model_dir, out, "--dataset", texts_file, "--num-samples", 16, "--max-length", 32, "--quiet"
    )
    assert (code, stderr) == (0, "")
    assert stdout.startswith(f"{out}: wanda unstructured sparsity 0.5000 over 14 linear layers")
    written = AutoModelForCausalLM.from_pretrained(out)
    expected = AutoModelForCausalLM.from_pretrained(model_dir)
    sparsify(expected, TEXTS, tokenizer=tokenizer, max_length=32, num_samples=16, progress=False)
    got, want = decoder_linears(written), decoder_linears(expected)
    assert sorted(got) == sorted(want) and len(got) == 14
    for name, weight in got.items():
        assert torch.equal(weight, want[name]), name
        assert torch.all((weight == 0).sum(dim=1) == weight.shape[1] // 2), name  # half of every row
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["sparsity"] == 0.5 and len(report["modules"]) == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sparse"]  # no temporary folder left
    assert (out / "tokenizer.json").exists()


def test_sparsify_two_four_by_magnitude(capsys, model_dir, tmp_path):
    code, stdout, _ = run(capsys, "sparsify", model_dir, tmp_path / "out", "--method", "magnitude", "--pattern", "2:4")
    assert code == 0 and "magnitude 2:4 sparsity 0.5000" in stdout
    for name, weight in decoder_linears(AutoModelForCausalLM.from_pretrained(tmp_path / "out")).items():
        groups = weight.reshape(weight.shape[0], -1, 4)
        assert torch.all((groups == 0).sum(dim=-1) == 2), name


def test_output_folder_is_refused_or_replaced_whole(capsys, model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, stdout, stderr = run(capsys, "sparsify", model_dir, out, "--method", "magnitude")
    assert code == 2 and stdout == ""
    assert stderr == f"peft-elastic sparsify: error: output '{out}' exists; choose another path or pass --overwrite\n"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, _ = run(capsys, "sparsify", model_dir, out, "--method", "magnitude", "--overwrite", "--quiet")
    assert code == 0 and (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    "case",
    ["column", "model", "gguf", "file", "wanda_without_data", "dataset_missing", "bad_suffix", "bad_pattern"],
)
def test_bad_inputs_end_with_one_line(capsys, model_dir, texts_file, tmp_path, case):
    out = tmp_path / "out"
    argv, expected = {
        "column": (
            [model_dir, out, "--dataset", texts_file, "--text-column", "body"],
            "dataset '{data}' has no column 'body'; its columns: ['text', 'id'] (use --text-column)",
        ),
        "model": (
            [tmp_path / "nowhere", out, "--method", "magnitude"],
            "cannot load model '{nowhere}': no such folder or file, and not a hub id ('name' or 'org/name')",
        ),
        "gguf": (
            [tmp_path / "nowhere.gguf", out, "--method", "magnitude"],
            "cannot load model '{nowhere}.gguf': GGUF file '{nowhere}.gguf' does not exist.",
        ),
        "file": (
            [texts_file, out, "--method", "magnitude"],
            "cannot load model '{data}': a file that is not a model: give a model folder, a hub id, a .gguf file or "
            "'smollm2'",
        ),
        "wanda_without_data": ([model_dir, out], "--method wanda needs calibration texts: --dataset"),
        "dataset_missing": ([model_dir, out, "--dataset", "no/such-dataset"], "cannot load dataset 'no/such-dataset'"),
        "bad_suffix": (
            [model_dir, out, "--dataset", texts_file.with_suffix(".txt")],
            ".jsonl, .json, .csv or .parquet",
        ),
        "bad_pattern": ([model_dir, out, "--method", "magnitude", "--pattern", "4:2"], "4:2"),
    }[case]
    texts_file.with_suffix(".txt").write_text("some text\n")
    code, stdout, stderr = run(capsys, "sparsify", *argv, "--quiet")
    message = expected.format(data=texts_file, nowhere=tmp_path / "nowhere")
    assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
    assert stderr.startswith("peft-elastic sparsify: error: ") and message in stderr, stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_argument_errors_and_the_console_script(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sparsify", "m", "o", "--sparsity", "1.5"])
    assert exit_info.value.code == 2 and "--sparsity: 1.5 is not in [0, 1)" in capsys.readouterr().err
    script = shutil.which("peft-elastic")
    command = [script] if script else [sys.executable, "-m", "peft_elastic.cli"]
    result = subprocess.run([*command, "sparsify", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "--pattern" in result.stdout and "Prune the linear layers" in result.stdout


def test_quantize_equals_the_library_call(capsys, model_dir, texts_file, tokenizer, tmp_path):
    from safetensors.torch import load_file

    from peft_elastic.quantization import quantize_gptq

    sparse = tmp_path / "sparse"
    assert run(capsys, "sparsify", model_dir, sparse, "--method", "magnitude", "--quiet")[0] == 0
    short = run(capsys, "quantize", sparse, tmp_path / "short", "--dataset", texts_file, "--group-size", 32, "--quiet")
    assert short[0] == 2 and "needs samples of more than 10 tokens (gptqmodel drops shorter ones)" in short[2]
    calibration = [" ".join(TEXTS[i : i + 8]) for i in range(0, len(TEXTS), 8)]  # long enough for gptqmodel
    joined = tmp_path / "joined.jsonl"
    joined.write_text("".join(json.dumps({"text": t}) + "\n" for t in calibration))
    out = tmp_path / "int4"
    code, stdout, stderr = run(
        capsys, "quantize", sparse, out, "--dataset", joined, "--group-size", 32, "--max-length", 64, "--quiet"
    )
    assert code == 0, stderr
    summary = stdout.splitlines()[-1]  # gptqmodel logs to stdout before it
    assert (
        summary.startswith(f"{out}: GPTQ INT4 (group 32, ") and "of 14 linear layers, sparsity kept 0.5000" in summary
    )
    reference = tmp_path / "reference"
    quantize_gptq(sparse, reference, calibration, bits=4, group_size=32, max_length=64)
    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert sorted(got) == sorted(want) and any(name.endswith(".qweight") for name in got)
    for name in got:
        assert torch.equal(got[name], want[name]), name
    assert (
        load_file(out / "sparsity_mask.safetensors").keys()
        == load_file(reference / "sparsity_mask.safetensors").keys()
    )
    code, _, stderr = run(capsys, "quantize", tmp_path / "nowhere", tmp_path / "other", "--dataset", joined, "--quiet")
    assert code == 2 and f"cannot load model '{tmp_path / 'nowhere'}': no such folder or file" in stderr
    code, _, stderr = run(capsys, "quantize", sparse, tmp_path / "other", "--quiet")
    assert (
        code == 2 and stderr == "peft-elastic quantize: error: GPTQ needs calibration texts: --dataset FILE_OR_NAME\n"
    )


def elastic_adapter(model_dir, folder, **config):
    """An elastic adapter with random B factors on the saved tiny model, saved to `folder`; returns the live model."""
    from conftest import randomize_lora_b
    from peft import get_peft_model

    from peft_elastic import ElasticLoraConfig

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = ElasticLoraConfig(r=8, lora_alpha=16, rank_choices=[8, 6, 4], target_modules=targets, **config)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    randomize_lora_b(model, std=0.2)
    model.save_pretrained(folder)
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_sub_adapter_merged_and_compressed(capsys, model_dir, tmp_path):
    from peft import PeftModel

    import peft_elastic

    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    adapter = tmp_path / "adapter"
    model = elastic_adapter(model_dir, adapter)
    heuristic = peft_elastic.heuristic_subnetwork(model)
    peft_elastic.set_subnetwork(model, heuristic)
    expected = logits(model, ids)

    code, stdout, stderr = run(capsys, "export", adapter, tmp_path / "sub", "--base", model_dir, "--subnetwork",
                               "heuristic", "--quiet")  # fmt: skip
    assert code == 0, stderr
    assert stdout.startswith(f"{tmp_path / 'sub'}: a stock LoRA adapter (subnetwork.json)\nheuristic subnetwork: ")
    assert json.loads((tmp_path / "sub" / "subnetwork.json").read_text()) == heuristic
    config = json.loads((tmp_path / "sub" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "sub").eval()
    torch.testing.assert_close(logits(stock, ids), expected, atol=1e-5, rtol=1e-5)

    front_entry = tmp_path / "best.json"  # an entry of a search's Pareto front
    front_entry.write_text(json.dumps({"subnetwork": heuristic, "metric": 1.0, "cost": 2.0}))
    code, _, stderr = run(capsys, "export", adapter, tmp_path / "merged", "--base", model_dir, "--as", "merged",
                          "--subnetwork", front_entry, "--quiet")  # fmt: skip
    assert code == 0, stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").exists()

    mode_b = tmp_path / "mode_b"
    model = elastic_adapter(model_dir, mode_b, width_choices=[1.0, 0.5], head_choices=[1.0, 0.5])
    minimal = peft_elastic.minimal_subnetwork(model)
    peft_elastic.set_subnetwork(model, minimal)
    code, _, stderr = run(capsys, "export", mode_b, tmp_path / "small", "--base", model_dir, "--as", "compressed",
                          "--subnetwork", "minimal", "--quiet")  # fmt: skip
    assert code == 0, stderr
    small = peft_elastic.load_compressed_model(tmp_path / "small").eval()
    assert small.model.layers[0].mlp.up_proj.out_features == 64  # half of 128: physically smaller
    torch.testing.assert_close(logits(small, ids), logits(model, ids), atol=1e-4, rtol=1e-4)


def test_export_uniform_rank(capsys, model_dir, tmp_path):
    from peft import PeftModel

    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    adapter = tmp_path / "adapter"
    model = elastic_adapter(model_dir, adapter)  # saved at full rank 8
    expected = logits(model, ids)
    for argv, rank in (([], 8), (["16"], 16)):
        out = tmp_path / f"uniform{rank}"
        code, _, stderr = run(capsys, "export", adapter, out, "--base", model_dir, "--uniform-rank", *argv, "--quiet")
        assert code == 0, stderr
        config = json.loads((out / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (rank, 2 * rank, {})
        stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
        torch.testing.assert_close(logits(stock, ids), expected, atol=1e-5, rtol=1e-5)
    code, _, stderr = run(capsys, "export", adapter, tmp_path / "m", "--base", model_dir, "--as", "merged",
                          "--uniform-rank", "--quiet")  # fmt: skip
    assert code == 2 and "--uniform-rank writes a LoRA adapter's ranks; it does not apply to --as merged" in stderr
    code, _, stderr = run(capsys, "export", adapter, tmp_path / "u", "--base", model_dir, "--uniform-rank", "4",
                          "--quiet")  # fmt: skip
    assert code == 2 and "uniform_rank must be True, False or a rank of at least 8" in stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "u").exists()


def test_export_errors(capsys, model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    elastic_adapter(model_dir, adapter)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model.layers.9.mlp.up_proj": 8}))
    stock = tmp_path / "stock"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4)).save_pretrained(stock)
    cases = [
        ([adapter, "--subnetwork", "midpoint"], "--subnetwork 'midpoint': use one of ['active', 'heuristic'"),
        ([adapter, "--subnetwork", unknown], "Unknown group name(s) ['model.layers.9.mlp.up_proj']"),
        ([tmp_path, "--subnetwork", "heuristic"], f"adapter '{tmp_path}' is not an adapter folder"),
        ([stock, "--subnetwork", "heuristic"], "the adapter is not elastic (it has one size); leave it out"),
        ([stock, "--as", "compressed"], "--as compressed needs an elastic adapter"),
    ]
    for argv, message in cases:
        code, stdout, stderr = run(
            capsys, "export", argv[0], tmp_path / "out", "--base", model_dir, *argv[1:], "--quiet"
        )
        assert code == 2 and stdout == "" and stderr.count("\n") == 1 and message in stderr, (argv, stderr)
        assert not (tmp_path / "out").exists()
    assert run(capsys, "export", stock, tmp_path / "out", "--base", model_dir, "--as", "merged", "--quiet")[0] == 0


def test_search_then_export_its_best(capsys, model_dir, texts_file, tmp_path):
    """search writes the trials, the front and best.json; export takes best.json as --subnetwork."""
    import peft_elastic
    from peft_elastic.search import SearchResult

    adapter = tmp_path / "adapter"
    elastic_adapter(model_dir, adapter, width_choices=[1.0, 0.5])
    out = tmp_path / "search"
    code, stdout, stderr = run(capsys, "search", adapter, out, "--base", model_dir, "--dataset", texts_file,
                               "--n-trials", 12, "--strategy", "random", "--num-samples", 16, "--quiet")  # fmt: skip
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["best.json", "pareto_front.json", "result.json", "search.db",
                                                      "search.png"]  # fmt: skip
    result = SearchResult.load(out / "result.json")
    best = json.loads((out / "best.json").read_text())
    assert len(result.trials) == 12 and best == result.best(max_metric_drop=0.01)
    assert json.loads((out / "pareto_front.json").read_text()) == result.pareto_front()
    assert stdout.startswith(f"{out}: 12 trials, {len(result.pareto_front())} on the Pareto front; the cheapest")
    # the metric is the validation loss of the trial's subnetwork, as LossEvaluator computes it on the same texts
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    peft_elastic.set_subnetwork(model, best["subnetwork"])
    tokenizer = train_tokenizer(TEXTS, vocab_size=96)
    loss = peft_elastic.search.LossEvaluator(TEXTS, tokenizer, max_length=512, num_samples=16)(model)
    assert best["metric"] == pytest.approx(loss, rel=1e-6)
    assert best["cost"] == peft_elastic.count_parameters(model)

    code, stdout, stderr = run(capsys, "export", adapter, tmp_path / "small", "--base", model_dir, "--as",
                               "compressed", "--subnetwork", out / "best.json", "--quiet")  # fmt: skip
    assert code == 0 and stdout.startswith(f"{tmp_path / 'small'}: the compressed model (subnetwork.json)"), stderr
    assert json.loads((tmp_path / "small" / "subnetwork.json").read_text()) == best["subnetwork"]
    small = peft_elastic.load_compressed_model(tmp_path / "small")
    assert sum(p.numel() for p in small.parameters()) == best["cost"]  # the deployed model the search priced
    code, _, stderr = run(capsys, "search", adapter, tmp_path / "s2", "--base", model_dir, "--dataset", texts_file,
                          "--answer-column", "answer", "--quiet")  # fmt: skip
    assert code == 2 and "has no column 'answer'; its columns: ['text', 'id'] (use --answer-column)" in stderr


def test_eval_equals_the_evaluators(capsys, model_dir, texts_file, tokenizer, tmp_path):
    from peft import PeftModel

    import peft_elastic
    from peft_elastic.search import ExactMatchEvaluator, LossEvaluator

    adapter = tmp_path / "adapter"
    elastic_adapter(model_dir, adapter)
    code, stdout, stderr = run(capsys, "eval", model_dir, "--adapter", adapter, "--subnetwork", "minimal",
                               "--dataset", texts_file, "--quiet")  # fmt: skip
    assert code == 0, stderr
    printed = json.loads(stdout)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    minimal = peft_elastic.minimal_subnetwork(model)
    peft_elastic.set_subnetwork(model, minimal)
    assert printed["metric"] == "loss" and printed["subnetwork"] == "minimal"
    assert printed["subnetwork_summary"] == cli.subnetworks.subnetwork_summary(minimal)
    assert printed["value"] == pytest.approx(LossEvaluator(TEXTS, tokenizer, num_samples=None)(model), rel=1e-6)

    problems = tmp_path / "problems.jsonl"
    rows = [{"prompt": p["prompt"], "answer": p["completion"]} for p in arithmetic_problems(6, seed=9)]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, stdout, _ = run(capsys, "eval", model_dir, "--dataset", problems, "--text-column", "prompt",
                          "--answer-column", "answer", "--quiet")  # fmt: skip
    expected = ExactMatchEvaluator(rows, tokenizer)(AutoModelForCausalLM.from_pretrained(model_dir))
    assert code == 0 and json.loads(stdout)["value"] == expected and json.loads(stdout)["subnetwork"] is None

    for argv, message in [
        ([model_dir], "give either --dataset (loss or exact match) or --tasks (lm-evaluation-harness), not both"),
        ([model_dir, "--dataset", texts_file, "--subnetwork", "minimal"], "--subnetwork minimal: only with --adapter"),
    ]:
        code, stdout, stderr = run(capsys, "eval", *argv, "--quiet")
        assert (code, stdout) == (2, "") and stderr == f"peft-elastic eval: error: {message}\n"


def test_eval_runs_lm_evaluation_harness_tasks(capsys, tmp_path):
    pytest.importorskip("lm_eval")
    from peft_elastic.search import LMEvalEvaluator

    # characters only: an answer's tokens never merge with the prompt's (lm-eval needs a non-empty continuation)
    tokenizer = train_tokenizer(TEXTS, vocab_size=20)
    model_dir = tmp_path / "model"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    data = tmp_path / "choice.jsonl"
    rows = [{"q": p["prompt"], "choices": [p["completion"], "7", "13"]} for p in arithmetic_problems(8, seed=3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy_cli_choice.yaml").write_text(
        f"task: toy_cli_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{q}}"\ntarget_delimiter: ""\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n'
    )
    code, stdout, stderr = run(capsys, "eval", model_dir, "--tasks", "toy_cli_choice", "--include-path", tmp_path,
                               "--quiet")  # fmt: skip
    assert code == 0, stderr
    printed = json.loads(stdout.splitlines()[-1])
    evaluator = LMEvalEvaluator("toy_cli_choice", tokenizer, include_path=tmp_path)
    assert printed["metric"] == "acc (toy_cli_choice)"
    assert printed["value"] == evaluator(AutoModelForCausalLM.from_pretrained(model_dir))


def test_train_saves_a_trained_super_adapter(capsys, model_dir, tmp_path):
    from peft import PeftConfig, PeftModel

    import peft_elastic

    data = tmp_path / "train.jsonl"
    problems = arithmetic_problems(32, seed=11)
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    out = tmp_path / "adapter"
    code, stdout, stderr = run(
        capsys, "train", model_dir, out, "--dataset", data, "--text-column", "prompt", "--completion-column",
        "completion", "--r", 8, "--rank-choices", "8,4", "--target-modules", "q_proj,v_proj,up_proj",
        "--sampler", "sandwich", "--max-steps", 3, "--batch-size", 4, "--learning-rate", 1e-2, "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    assert stdout.splitlines()[-1].startswith(f"{out}: NLSConfig adapter trained 3 steps (sandwich subnetworks)")
    config = PeftConfig.from_pretrained(out)
    assert (config.r, config.rank_choices, sorted(config.target_modules)) == (
        8,
        [8, 4],
        ["q_proj", "up_proj", "v_proj"],
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    space = peft_elastic.search_space(model)
    assert len(space) == 2 * 2 and all(choices == [8, 4] for choices in space.values())  # q+v share a rank
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(trained) == 2 * 3 and all(torch.count_nonzero(p) > 0 for p in trained)  # B starts at zero

    for argv, message in [
        (["--rank-choices", "8,x"], "argument --rank-choices: '8,x' is not a comma-separated list of integers"),
        (
            ["--method", "nls", "--width-choices", "1.0,0.5"],
            "--width-choices is Mode B: use it with --method elastic-lora",
        ),
        (["--quantization-aware"], "--quantization-aware is QA-SparsePEFT: use it with --method sparse-peft, not nls"),
        (["--text-column", "question"], "has no column 'question'; its columns: ['prompt', 'completion']"),
    ]:
        if argv[0] == "--rank-choices":
            with pytest.raises(SystemExit):
                main(["train", str(model_dir), str(tmp_path / "x"), "--dataset", str(data), *argv])
            assert message in capsys.readouterr().err
            continue
        code, _, stderr = run(capsys, "train", model_dir, tmp_path / "x", "--dataset", data, *argv, "--quiet")
        assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr


def test_a_missing_optional_package_is_one_line(capsys, model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the eval extra were not installed
    code, stdout, stderr = run(capsys, "eval", model_dir, "--tasks", "arc_easy", "--quiet")
    assert (code, stdout) == (2, "") and stderr.count("\n") == 1
    assert stderr.startswith("peft-elastic eval: error: LMEvalEvaluator needs lm-evaluation-harness")
