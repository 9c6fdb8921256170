"""Messages and progress: readable CLI summaries, warnings for target-module typos, "no such file" for missing local
inputs, the message of `load_compressed_model` on a folder that is not a model, the progress of
`reorder_by_importance`, and CLI errors reported before any model is loaded."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import peft_elastic
from peft_elastic import cli
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer

TEXTS = [p["prompt"] + p["completion"] for p in arithmetic_problems(24, seed=5)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_tokenizer(TEXTS, vocab_size=96)
    folder = tmp_path_factory.mktemp("model")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="module")
def mode_b_adapter(model_dir, tmp_path_factory):
    """A Mode B adapter (ranks 8/6/4, MLP widths 128/64, heads 4/2) on the 2-layer tiny Llama, saved."""
    folder = tmp_path_factory.mktemp("adapter") / "mode_b"
    config = peft_elastic.ElasticLoraConfig(
        r=8, lora_alpha=16, rank_choices=[8, 6, 4], target_modules=TARGETS, width_choices=[1.0, 0.5],
        head_choices=[1.0, 0.5],
    )  # fmt: skip
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(folder)
    return folder


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------ summaries (issue 20)


def test_export_prints_a_summary_and_writes_the_subnetwork_to_a_file(capsys, model_dir, mode_b_adapter, tmp_path):
    out = tmp_path / "small"
    code, stdout, stderr = run(capsys, "export", mode_b_adapter, out, "--base", model_dir, "--as", "compressed",
                               "--subnetwork", "heuristic", "--quiet")  # fmt: skip
    assert code == 0, stderr
    assert stdout.splitlines() == [
        f"{out}: the compressed model (subnetwork.json)",
        "heuristic subnetwork: ranks 6 in 10 groups, MLP widths 128 in 2 blocks, heads 4 in 2 blocks",
        "  groups                                         n  choices  chosen",
        "  model.layers.*.self_attn.q_proj+k_proj+v_proj  2  8/6/4    6 in 2",
        "  model.layers.*.self_attn.o_proj                2  8/6/4    6 in 2",
        "  model.layers.*.mlp.gate_proj                   2  8/6/4    6 in 2",
        "  model.layers.*.mlp.up_proj                     2  8/6/4    6 in 2",
        "  model.layers.*.mlp.down_proj                   2  8/6/4    6 in 2",
        "  model.layers.*.self_attn:heads                 2  4/2      4 in 2",
        "  model.layers.*.mlp:width                       2  128/64   128 in 2",
    ]
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), mode_b_adapter)
    assert json.loads((out / "subnetwork.json").read_text()) == peft_elastic.heuristic_subnetwork(model)


def test_the_summary_counts_each_choice(capsys, model_dir, mode_b_adapter, tmp_path):
    chosen = tmp_path / "chosen.json"  # a search result's entry: one layer narrower than the other
    chosen.write_text(json.dumps({"subnetwork": {"model.layers.1.mlp:width": 64, "model.layers.1.self_attn:heads": 2,
                                                 "model.layers.1.mlp.up_proj": 4}, "metric": 1.0}))  # fmt: skip
    out = tmp_path / "sub"
    code, stdout, stderr = run(capsys, "export", mode_b_adapter, out, "--base", model_dir, "--as", "compressed",
                               "--subnetwork", chosen, "--quiet")  # fmt: skip
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[1] == (
        f"subnetwork {chosen}: ranks 8/4 in 9/1 groups, MLP widths 128/64 in 1/1 blocks, heads 4/2 in 1/1 blocks"
    )
    assert "  model.layers.*.mlp.up_proj                     2  8/6/4    8/4 in 1/1" in lines
    assert json.loads((out / "subnetwork.json").read_text())["model.layers.1.mlp:width"] == 64


def test_eval_prints_one_json_line_with_a_summary_not_the_groups(capsys, model_dir, mode_b_adapter, texts_file):
    code, stdout, stderr = run(capsys, "eval", model_dir, "--adapter", mode_b_adapter, "--subnetwork", "minimal",
                               "--dataset", texts_file, "--quiet")  # fmt: skip
    assert code == 0, stderr
    assert stdout.count("\n") == 1
    printed = json.loads(stdout)
    assert sorted(printed) == ["adapter", "metric", "model", "subnetwork", "subnetwork_summary", "value"]
    assert printed["subnetwork"] == "minimal"
    assert printed["subnetwork_summary"] == "ranks 4 in 10 groups, MLP widths 64 in 2 blocks, heads 2 in 2 blocks"
    assert "model.layers.0" not in stdout


# ------------------------------------------------------------------------------------------ target modules


@pytest.mark.parametrize("config_class", ["ElasticLoraConfig", "NLSConfig", "SparsePEFTConfig"])
def test_a_target_module_typo_warns_with_the_closest_names(config_class):
    config = getattr(peft_elastic, config_class)(r=4, target_modules=["q_prj", "v_proj", "mlp.upproj"])
    with pytest.warns(RuntimeWarning) as caught:
        model = get_peft_model(tiny_llama(), config)
    messages = [str(w.message) for w in caught if "target_modules" in str(w.message)]
    assert messages == [
        f"{config_class} target_modules entries ['mlp.upproj', 'q_prj'] match no module of the model and adapt "
        "nothing: 'mlp.upproj' (closest module names: 'mlp.up_proj', 'mlp.gate_proj', 'mlp.down_proj'), 'q_prj' "
        "(closest module names: 'q_proj', 'v_proj', 'o_proj'). Only the modules matching ['v_proj'] are adapted; "
        "fix or remove those entries."
    ]
    assert sorted(name.rsplit(".", 1)[-1] for name in model.base_model.targeted_module_names) == ["v_proj", "v_proj"]


def test_one_unmatched_entry_is_named_in_the_singular():
    with pytest.warns(RuntimeWarning) as caught:
        get_peft_model(tiny_llama(), peft_elastic.NLSConfig(r=4, target_modules=["q_proj", "up_prj"]))
    assert [str(w.message) for w in caught if "target_modules" in str(w.message)] == [
        "NLSConfig target_modules entry ['up_prj'] matches no module of the model and adapts nothing: 'up_prj' "
        "(closest module names: 'up_proj', 'v_proj', 'q_proj'). Only the modules matching ['q_proj'] are adapted; "
        "fix or remove that entry."
    ]


def test_matching_targets_and_a_regex_do_not_warn():
    for targets in (["q_proj", "model.layers.1.mlp.up_proj"], r".*\.(q_prj|v_proj)"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            get_peft_model(tiny_llama(), peft_elastic.ElasticLoraConfig(r=4, target_modules=targets))
        assert [str(w.message) for w in caught if "target_modules" in str(w.message)] == [], targets


# ------------------------------------------------------------------------------------------ missing local files


@pytest.mark.parametrize("name", ["nope.jsonl", "data/more/nope", "./nope"])
def test_a_missing_local_dataset_file_says_no_such_file(capsys, model_dir, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run(capsys, "sparsify", model_dir, tmp_path / "out", "--dataset", name, "--quiet")
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"peft-elastic sparsify: error: dataset {name!r}: no such file or folder (--dataset takes a .jsonl, .json, "
        ".csv or .parquet file, a folder saved with Dataset.save_to_disk, or a hub dataset name such as "
        "'org/name')\n"
    )


def test_load_compressed_model_of_an_adapter_folder_says_what_to_call(mode_b_adapter, tmp_path):
    with pytest.raises(ValueError) as error:
        peft_elastic.load_compressed_model(mode_b_adapter)
    assert str(error.value) == (
        f"{str(mode_b_adapter)!r} is an adapter folder (adapter_config.json), not a model: load it on its base with "
        "peft.PeftModel.from_pretrained(base, path), or write its compressed model with `peft-elastic export "
        "ADAPTER OUTPUT --base MODEL --as compressed` (peft_elastic.export_compressed_model) and load that folder."
    )
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError) as error:
        peft_elastic.load_compressed_model(tmp_path)
    assert str(error.value) == (
        f"{str(tmp_path)!r} holds no config.json, so it is not a model folder: give the folder "
        "export_compressed_model (or save_pretrained) wrote."
    )


# ------------------------------------------------------------------------------------------ progress


def test_reorder_by_importance_shows_progress_unless_asked_not_to(capsys):
    tokenizer = train_tokenizer(TEXTS, vocab_size=96)
    peft_elastic.reorder_by_importance(tiny_llama(), TEXTS[:6], tokenizer=tokenizer, max_length=16, progress=False)
    assert capsys.readouterr().err == ""
    peft_elastic.reorder_by_importance(tiny_llama(), TEXTS[:6], tokenizer=tokenizer, max_length=16)
    err = capsys.readouterr().err
    assert "importance (calibration): 100%" in err and "6/6" in err
    assert "importance (reordering): 100%" in err and "4/4" in err  # 2 MLPs and 2 attention blocks


# ------------------------------------------------------------------------------------------ errors before loading


def forbid_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test on any model load, and make torch, transformers, peft and datasets unimportable: the checks
    must come before the CLI imports or loads anything."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for name in ("load_model", "check_model", "resolved"):
        monkeypatch.setattr(cli.inputs, name, load)  # every command loads through cli.inputs
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    monkeypatch.setattr(peft_elastic.models, "resolve_model", load)
    for module in ("torch", "transformers", "peft", "datasets"):
        monkeypatch.setitem(sys.modules, module, None)


def test_bad_paths_are_reported_before_any_model_load(capsys, model_dir, mode_b_adapter, texts_file, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[8, 6]")
    (tmp_path / "empty").mkdir()
    missing = tmp_path / "missing"
    out = tmp_path / "out"
    adapter_io = [mode_b_adapter, out, "--base", model_dir]
    cases = [
        (["sparsify", model_dir, existing, "--method", "magnitude"],
         f"output '{existing}' exists; choose another path or pass --overwrite"),
        (["train", model_dir, existing, "--dataset", texts_file],
         f"output '{existing}' exists; choose another path or pass --overwrite"),
        (["export", mode_b_adapter, existing, "--base", model_dir],
         f"output '{existing}' exists; choose another path or pass --overwrite"),
        (["search", mode_b_adapter, existing, "--base", model_dir, "--dataset", texts_file],
         f"output '{existing}' exists; choose another path or pass --overwrite"),
        (["eval", model_dir, "--dataset", missing / "test.jsonl"],
         f"dataset '{missing / 'test.jsonl'}': no such file"),
        (["search", *adapter_io, "--dataset", missing / "val.csv"], f"dataset '{missing / 'val.csv'}': no such file"),
        (["eval", model_dir, "--adapter", tmp_path / "empty", "--dataset", texts_file],
         f"adapter '{tmp_path / 'empty'}' is not an adapter folder (no adapter_config.json in it)"),
        (["export", missing, out, "--base", model_dir], f"adapter '{missing}': no such folder"),
        (["export", model_dir, out, "--base", model_dir],
         f"adapter '{model_dir}' is a model folder (config.json), not an adapter folder (adapter_config.json)"),
        (["export", *adapter_io, "--subnetwork", missing / "best.json"],
         f"--subnetwork '{missing / 'best.json'}': no such file; use one of ['active', 'heuristic', 'maximal', "
         "'minimal'] or a JSON file {group name: choice}"),
        (["export", *adapter_io, "--subnetwork", "midpoint"],
         "--subnetwork 'midpoint': use one of ['active', 'heuristic', 'maximal', 'minimal'] or a JSON file"),
        (["export", *adapter_io, "--subnetwork", tmp_path / "bad.json"],
         f"--subnetwork '{tmp_path / 'bad.json'}' is not valid JSON (Expecting property name"),
        (["eval", model_dir, "--adapter", mode_b_adapter, "--subnetwork", tmp_path / "list.json", "--dataset",
          texts_file], f"--subnetwork '{tmp_path / 'list.json'}' must hold a JSON object {{group name: choice}}"),
        (["sparsify", missing, out, "--method", "magnitude"],
         f"cannot load model '{missing}': no such folder or file, and not a hub id ('name' or 'org/name'); give a "
         "model folder, a hub id, a .gguf file or 'smollm2'"),
        (["quantize", missing / "m.gguf", out, "--dataset", texts_file],
         f"cannot load model '{missing / 'm.gguf'}': GGUF file '{missing / 'm.gguf'}' does not exist."),
        (["train", texts_file, out, "--dataset", texts_file],
         f"cannot load model '{texts_file}': a file that is not a model: give a model folder, a hub id, a .gguf "
         "file or 'smollm2'"),
        (["eval", tmp_path / "empty", "--dataset", texts_file],
         f"cannot load model '{tmp_path / 'empty'}': the folder holds no config.json, so it is not a model folder "
         "(save_pretrained writes one)"),
        (["export", *adapter_io[:3], mode_b_adapter],
         f"cannot load model '{mode_b_adapter}': it is an adapter folder (adapter_config.json), not a model; pass "
         "it as the adapter (export/search ADAPTER, eval --adapter) and its base model as --base/MODEL"),
        (["demo", "--model", missing], f"cannot load model '{missing}': no such folder or file"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.MonkeyPatch.context() as patch:
            forbid_model_loads(patch)
            code, stdout, stderr = run(capsys, *argv, *(["--quiet"] if argv[0] != "demo" else []))
        assert (code, stdout) == (2, ""), (argv, stdout, stderr)
        assert stderr.startswith(f"peft-elastic {argv[0]}: error: {message}") and stderr.count("\n") == 1, (
            argv,
            stderr,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "empty", "existing", "list.json"]
    assert list(existing.iterdir()) == []


def test_a_hub_id_is_left_to_the_hub(capsys, tmp_path, monkeypatch):
    """'org/name' and 'name' are not checked as paths: they may be hub ids (here offline: one line, after trying)."""
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run(capsys, "sparsify", "no-such-org/no-such-model", tmp_path / "out", "--method", "magnitude",
                          "--quiet")  # fmt: skip
    assert code == 2 and "cannot load model 'no-such-org/no-such-model': not a local folder" in stderr
