"""The demo (the README's main job): its task, its tokenizer, its cached base, and a quick end-to-end run through the
CLI whose tables are checked against what each pipeline must produce."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from peft_elastic import cli
from peft_elastic.demo import QUICK
from peft_elastic.demo import base as demo_base
from peft_elastic.demo.task import pretraining_texts, splits, word_problem
from peft_elastic.toy import train_tokenizer

EQUATION = re.compile(r"(\d+)([+-])(\d+)=(\d+)\.")


def check_problem(problem: dict[str, str]) -> None:
    """Every equation of the worked answer is right, chains from the story's numbers, and "####" gives the result."""
    numbers = [int(n) for n in re.findall(r"\d+", problem["prompt"])]
    equations = EQUATION.findall(problem["completion"])
    assert 2 <= len(equations) == len(numbers) - 1 <= 3, problem
    total = numbers[0]
    for (a, op, b, result), n in zip(equations, numbers[1:], strict=True):
        assert (int(a), int(b)) == (total, n), problem
        total = total + n if op == "+" else total - n
        assert int(result) == total >= 0, problem
        assert ("more" in problem["prompt"]) or op == "-", problem
    assert problem["completion"].endswith(f"\n#### {total}"), problem


def test_problems_are_right_and_splits_disjoint():
    data = splits(300, 50, 80, seed=3)
    assert [len(data[s]) for s in ("train", "validation", "test")] == [300, 50, 80]
    prompts = [p["prompt"] for split in data.values() for p in split]
    assert len(set(prompts)) == len(prompts)
    for split in data.values():
        for problem in split:
            check_problem(problem)
    assert splits(300, 50, 80, seed=3) == data  # deterministic
    held_out = {p["prompt"] for p in data["test"] + data["validation"]}
    corpus = pretraining_texts(3000, held_out, seed=3, worked_fraction=0.3)
    worked = [t for t in corpus if t.startswith("Question:")]
    assert 0.2 < len(worked) / len(corpus) < 0.4
    assert not any(t.split("\nAnswer:")[0] + "\nAnswer:" in held_out for t in worked)
    drills = [t for t in corpus if EQUATION.match(t)]
    for text in drills:
        for a, op, b, result in EQUATION.findall(text):
            assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_worked_steps_choose_the_corpus_problems_and_key_the_cache():
    corpus = pretraining_texts(2000, set(), seed=3, worked_fraction=0.3, worked_steps=(3,))
    worked = [t for t in corpus if t.startswith("Question:")]
    assert worked and all(len(EQUATION.findall(t)) == 3 for t in worked)
    mixed = [t for t in pretraining_texts(2000, set(), seed=3, worked_fraction=0.3) if t.startswith("Question:")]
    assert {len(EQUATION.findall(t)) for t in mixed} == {1, 2, 3}  # the default: one to three steps
    key = demo_base.BaseSettings().key
    assert key() == "base-10a493a6b98a"  # stable across releases: a changed key re-trains every user's base
    assert demo_base.BaseSettings(pack_width=None).key() not in (key(), "base-8679cf8633b5")  # packing keys it
    assert key() == demo_base.BaseSettings(worked_steps=(1, 2, 3)).key()
    assert (
        len(
            {key(), demo_base.BaseSettings(worked_steps=(1, 2)).key(), demo_base.BaseSettings(worked_steps=(3,)).key()}
        )
        == 3
    )
    for bad in ((), (0,), (2, True)):
        with pytest.raises(ValueError, match=r"worked_steps must be a non-empty tuple of step counts >= 1, got"):
            pretraining_texts(10, set(), worked_steps=bad)


def test_answer_anatomy_tells_format_copying_and_arithmetic_apart():
    from peft_elastic.demo.tables import anatomy_markdown
    from peft_elastic.demo.task import answer_anatomy

    problem = {
        "prompt": "Question: Leo has 13 apples. He picks up 8 more. Then he loses 4. "
        "How many apples does Leo have now?\nAnswer:",
        "completion": " 13+8=21. 21-4=17.\n#### 17",
    }
    completions = [
        " 13+8=21. 21-4=17.\n#### 17",  # right
        " 13+8=21. 21-4=18.\n#### 18",  # the operands read right, one sum wrong
        " 13+5=18. 18-4=14.\n#### 14",  # the amount misread, the sums right
        " 13+8=21.\n#### 21",  # a step missing
        " 13 + 8 is 21",  # no equation in the format, no "####"
    ]
    anatomy = answer_anatomy([problem] * 5, completions)
    assert anatomy == {
        "formatted": 4 / 5,
        "steps": 3 / 5,
        "operands": 6 / 10,  # of 10 expected steps: 2 + 2 + 1 + 1 + 0
        "arithmetic": 6 / 7,  # of 7 written equations, one sum is wrong
        "right": 1 / 5,
    }
    with pytest.raises(ValueError, match="Need one completion per problem"):
        answer_anatomy([problem], [])
    row = type("Row", (), {"method": "LoRA", "anatomy": anatomy})()
    assert anatomy_markdown([row]).splitlines()[2] == "| LoRA | 80.0% | 60.0% | 60.0% | 85.7% | 20.0% |"
    assert anatomy_markdown([type("Row", (), {"method": "old", "anatomy": None})()]) == ""


def test_word_tokenizer_keeps_prompts_as_prefixes_and_digits_apart():
    import random

    rng = random.Random(0)
    problems = [word_problem(rng, rng.randint(1, 3)) for _ in range(300)]
    texts = [p["prompt"] + p["completion"] for p in problems]
    tokenizer = train_tokenizer(texts, vocab_size=200, words=True)
    for problem, text in zip(problems, texts, strict=True):
        ids, prompt = tokenizer(text).input_ids, tokenizer(problem["prompt"]).input_ids
        assert ids[: len(prompt)] == prompt  # what TRL's completion-only loss assumes
        assert tokenizer.decode(ids) == text
    pieces = {tokenizer.decode([i]) for i in tokenizer(" ".join(texts)).input_ids}
    assert all(not any(c.isdigit() for c in piece) or piece.strip().isdigit() and len(piece) == 1 for piece in pieces)
    # without words=True, merges run across the prompt's end: the problem this option solves
    plain = train_tokenizer(texts, vocab_size=200)
    broken = sum(plain(t).input_ids[: len(plain(p["prompt"]).input_ids)] != plain(p["prompt"]).input_ids
                 for p, t in zip(problems, texts, strict=True))  # fmt: skip
    assert broken > 0


def test_packed_pretraining_batch_has_the_padded_batchs_loss_and_gradient():
    import torch

    from peft_elastic.toy import tiny_llama

    texts = pretraining_texts(24, set(), seed=3, worked_fraction=0.3)
    tokenizer = train_tokenizer(texts, vocab_size=120, words=True)
    packed, padded = demo_base.packed_batch(tokenizer, texts), demo_base.padded_batch(tokenizer, texts)
    lengths = padded["attention_mask"].sum(1)
    assert packed["input_ids"].shape == (packed["input_ids"].shape[0], int(lengths.max()))
    wide = demo_base.packed_batch(tokenizer, texts, width=2 * int(lengths.max()))
    assert (
        wide["input_ids"].shape[1] == 2 * int(lengths.max())
        and wide["input_ids"].numel() < packed["input_ids"].numel()
    )
    assert packed["input_ids"].shape[0] < len(texts)  # fewer rows than documents: the padding is gone
    real = packed["labels"] != -100
    assert int(real.sum()) == int((lengths - 1).sum())  # every token but each document's first is predicted
    starts = packed["position_ids"] == 0
    assert int((starts & (packed["input_ids"] != tokenizer.pad_token_id)).sum()) == len(texts)
    assert sorted(packed["input_ids"][real].tolist()) == sorted(
        padded["labels"][:, 1:][padded["labels"][:, 1:] != -100].tolist()
    )

    def loss_and_grads(batch):
        model = tiny_llama(vocab_size=len(tokenizer), seed=1)
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {name: p.grad for name, p in model.named_parameters()}

    def largest_difference(grads, expected):  # relative to each parameter's largest gradient
        return max(float((grads[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in expected)

    (loss, grads), (expected, expected_grads) = loss_and_grads(packed), loss_and_grads(padded)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert largest_difference(grads, expected_grads) < 1e-5  # measured: 3.5e-7
    loss, grads = loss_and_grads(wide)  # two or three documents a row
    assert loss == pytest.approx(expected, rel=1e-5)
    assert largest_difference(grads, expected_grads) < 1e-5
    # without the restarts the documents would attend to each other: another gradient (what the test guards; 0.18)
    unmasked = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    assert largest_difference(loss_and_grads(unmasked)[1], expected_grads) > 1e-2


def test_packing_no_text_is_refused():
    tokenizer = train_tokenizer(pretraining_texts(8, set(), seed=3), vocab_size=120, words=True)
    with pytest.raises(ValueError, match="packed_batch needs at least one text to pack, got none"):
        demo_base.packed_batch(tokenizer, [])


@pytest.mark.parametrize("width", [0, -3, 2.5, True, "100"])
def test_pack_width_must_be_a_number_of_tokens(width):
    with pytest.raises(
        ValueError, match=f"pack_width must be a number of tokens >= 1, or None .*got {re.escape(repr(width))}"
    ):
        demo_base.BaseSettings(pack_width=width)


def test_base_is_built_once_per_setting_and_never_half_written(tmp_path, monkeypatch):
    settings = dataclasses.replace(QUICK.base, steps=3)
    folder = demo_base.pretrained_base(settings, set(), tmp_path, log=lambda *_: None)
    record = json.loads((folder / "pretraining.json").read_text())
    assert record["settings"]["steps"] == 3 and record["parameters"] > 0
    model, tokenizer = demo_base.load_base(folder)
    assert model.config.hidden_size == settings.hidden_size and len(tokenizer) <= settings.vocab_size

    def fail(*_):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo_base, "pretrain", fail)
    assert demo_base.pretrained_base(settings, set(), tmp_path, log=lambda *_: None) == folder  # cached: no training
    other = dataclasses.replace(settings, steps=4)
    assert other.key() != settings.key()
    with pytest.raises(RuntimeError, match="interrupted"):
        demo_base.pretrained_base(other, set(), tmp_path, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # nothing of the failed build is left


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_ELASTIC_CACHE", str(tmp_path / "x"))
    assert demo_base.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("PEFT_ELASTIC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo_base.default_cache_dir() == tmp_path / "peft_elastic"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """`python -m peft_elastic.demo --quick` as a user runs it with its output sent to files (not a terminal): the
    return code, the output folder and the root (whose stdout.txt / stderr.txt hold what it printed)."""
    root = tmp_path_factory.mktemp("demo")
    output = root / "out"
    command = [sys.executable, "-m", "peft_elastic.demo", "--quick", "--output", str(output), "--cache-dir",
               str(root / "cache")]  # fmt: skip
    with open(root / "stdout.txt", "w") as stdout, open(root / "stderr.txt", "w") as stderr:
        code = subprocess.run(command, stdout=stdout, stderr=stderr, timeout=1200).returncode
    return code, output, root


def test_quick_demo_tables(quick_demo):
    code, output, root = quick_demo
    assert code == 0, (root / "stderr.txt").read_text()[-3000:]
    results = json.loads((output / "results.json").read_text())
    table2 = {row["key"]: row for row in results["table2"]}
    assert list(table2) == [
        "dense",
        "sparse",
        "lora",
        "lora_repruned",
        "shears",
        "sparse_peft",
        "sqft",
        "qa_sparse_peft",
    ]
    assert table2["dense"]["sparsity"] == 0
    for key in ("sparse", "lora", "lora_repruned", "shears", "sparse_peft"):
        assert table2[key]["sparsity"] == 0.5, key  # Wanda at 50 % per output row: exactly half of every layer
    assert table2["lora_repruned"]["merged_sparsity"] == 0.5  # LoRA merged, then pruned again
    assert table2["sparse_peft"]["merged_sparsity"] == 0.5  # SparsePEFT's merge keeps every zero
    assert table2["lora"]["merged_sparsity"] < 0.01 and table2["shears"]["merged_sparsity"] < 0.01  # dense updates
    assert table2["sqft"]["merged_sparsity"] is None  # an FP adapter on INT4 is not merged
    assert table2["sqft"]["sparsity"] >= 0.5 and table2["qa_sparse_peft"]["merged_sparsity"] >= 0.5
    assert [table2[k]["precision"] for k in ("sqft", "qa_sparse_peft")] == ["INT4 + FP32", "INT4"]
    for row in results["table2"] + results["table1"]:
        assert 0 <= row["accuracy"] <= 1 and len(row["hits"]) == 24  # one per test problem (bootstrap intervals)
        assert row["accuracy"] == sum(row["hits"]) / 24 and row["perplexity"] is None  # no real text for the toy
        assert set(row["anatomy"]) == {"formatted", "steps", "operands", "arithmetic", "right"}
        assert row["anatomy"]["right"] <= min(row["accuracy"], row["anatomy"]["formatted"])
    table1 = results["table1"]
    assert table1[0]["method"] == "LoRA (merged)" and table1[0]["speedup"] == 1.0
    assert (
        table1[0]["params"] == results["base"]["pretraining"]["parameters"]
    )  # LoRA merges into a model of the base's size
    heuristic = table1[1]
    assert heuristic["method"] == "LoNAS (heuristic subnetwork)"
    assert heuristic["params"] < table1[0]["params"] and heuristic["macs"] < table1[0]["macs"]
    assert all(row["latency_ms"] > 0 for row in table1)
    text = (output / "tables.md").read_text()
    assert "| SQFT + QA-SparsePEFT (merged) |" in text and "| LoNAS (heuristic subnetwork) |" in text
    assert len(results["findings"]) >= 7
    assert all(re.match(r"- \[(holds|differs|within noise|n/a)\] ", claim) for claim in results["findings"])
    assert set(results["stages"]) >= {"setup", "table2 lora", "table2 qa_sparse_peft", "table1"}
    # the deliverables are on disk: the sparse and INT4 bases, the adapters, the merged models, the exports
    for name in ("sparse-base", "sparse-int4", "shears-nls-adapter", "sqft-sparsepeft-merged", "sqft-int4-nls-adapter",
                 "sqft-qa-int4-merged", "lonas-super-adapter", "lonas-subnetwork-0"):  # fmt: skip
        assert (output / name).is_dir(), name
    config = json.loads((output / "sqft-qa-int4-merged" / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4


#: What a quiet run must not print: library banners, log records and per-batch progress lines.
NOISE = re.compile(
    r"\bINFO\b|\bWARNING\b|GPTQModel|gptqmodel|it/s\]|Loading weights|%\||Failed to load|^[WIE]\d{4} \d\d:", re.M
)


def test_quick_demo_output_is_a_screenful_per_table(quick_demo):
    """Sent to a file, the run prints one line per stage, the tables and the findings: under 100 lines in all, no
    library banner, log record or progress bar on either stream."""
    code, _, root = quick_demo
    assert code == 0
    out, err = (root / "stdout.txt").read_text(), (root / "stderr.txt").read_text()
    lines = out.splitlines() + err.splitlines()
    assert len(lines) < 100, f"{len(lines)} lines:\n" + "\n".join(lines)
    noisy = [line for line in lines if NOISE.search(line)]
    assert not noisy, "\n".join(noisy[:20])
    assert "| LoRA |" in out and "| LoNAS (heuristic subnetwork) |" in out  # the tables are there
    assert re.search(r"^Done in \d+ s\.$", out, re.M)


def test_exported_lonas_subnetwork_has_the_tabled_size(quick_demo):
    from peft_elastic import count_parameters, load_compressed_model

    _, output, _ = quick_demo
    heuristic = json.loads((output / "results.json").read_text())["table1"][1]
    assert count_parameters(load_compressed_model(output / "lonas-subnetwork-0")) == heuristic["params"]


def test_demo_refuses_an_existing_output(quick_demo, capsys):
    _, output, root = quick_demo
    before = sorted(p.name for p in output.iterdir())
    assert cli.main(["demo", "--quick", "--output", str(output), "--cache-dir", str(root / "cache")]) == 2
    assert "exists; choose another path or pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == before


def test_demo_tables_section_for_results_md(quick_demo, tmp_path):
    from pathlib import Path

    _, output, _ = quick_demo
    root = Path(__file__).resolve().parents[1]
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nKept.\n")
    command = [sys.executable, "benchmarks/demo_tables.py", "--from", str(output / "results.json"), "--results",
               str(results)]  # fmt: skip
    subprocess.run(command, cwd=root, check=True, capture_output=True, timeout=300)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nKept.\n\n<!-- demo_tables:start -->\n")
    assert text.rstrip().endswith("<!-- demo_tables:end -->")
    assert "(--quick: smoke-test budgets, the accuracies mean nothing)" in text
    assert json.loads((output / "results.json").read_text())["base_was_cached"] is False  # a fresh cache directory
    assert re.search(r"the run took \d+ s, \d+ s of which pre-trained the base", text)
    assert f"`python benchmarks/demo_tables.py --from {output / 'results.json'} --results {results}`" in text
    assert (output / "tables.md").read_text().split("\n\n", 1)[1].split("\n\n")[0] in text  # Table 2, verbatim
    run_results = json.loads((output / "results.json").read_text())
    assert all(claim in text for claim in run_results["findings"])


def test_demo_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Table 2 (50% Wanda sparsity" in text and "%%" not in text
    assert "--quick" in text and "--overwrite" in text and "--cache-dir" in text


def test_a_search_claim_between_two_zero_scores_is_not_judged():
    """On SmolLM2 with a short budget every subnetwork but the maximal scored 0 on validation and test: "search
    finds one at least as accurate" held vacuously (0 >= 0); it is n/a, with the reason."""
    from peft_elastic.demo.lonas import CostRow
    from peft_elastic.demo.sqft import Row
    from peft_elastic.demo.tables import findings

    def row(key, hits, sparsity=0.5, merged=0.5):
        return Row(key, key, sum(hits) / len(hits), sparsity, merged, "FP32", hits)

    hit, miss = [True, False, False, False], [False] * 4
    keys = ["dense", "sparse", "lora", "lora_repruned", "shears", "sparse_peft", "sqft", "qa_sparse_peft"]
    sqft = [row(key, hit, merged=0.0 if key in ("lora", "shears") else 0.5) for key in keys]

    def lonas(search_hits, search_validation):
        return [
            CostRow("LoRA (merged)", 0.25, 0.5, 100, 100, 10.0, 1.0, hit),
            CostRow("LoNAS (heuristic subnetwork)", 0.0, 0.0, 80, 80, 8.0, 1.25, miss),
            CostRow(
                "LoNAS (search subnetwork 1)", sum(search_hits) / 4, search_validation, 60, 60, 6.0, 1.6, search_hits
            ),
        ]

    silent = findings(sqft, lonas(miss, 0.0))[-1]
    assert silent.startswith("- [n/a] Search finds a subnetwork no larger than the heuristic one")
    assert silent.endswith("(both score 0 on validation and test: the search had nothing to rank them by)")
    judged = findings(sqft, lonas(hit, 0.25))[-1]
    assert judged.startswith("- [holds] Search finds") and "95% interval" in judged  # 25% >= 0% on every draw

    rows = lonas([True, True, True, False], 0.75)
    rows[1].hits, rows[1].accuracy = [True, True, True, False], 0.75  # the heuristic scores: a ratio to it
    same = findings(sqft, rows)[-1]
    assert same.startswith("- [holds] Search finds") and "100.0% of it" in same and same.endswith("[1, 1])")

    # the heuristic subnetwork's speedup is judged on its paired timing rounds
    rows = lonas(hit, 0.25)
    rows[0].latency_rounds_ms = [10.0, 12.0, 11.0, 13.0] * 5
    rows[1].latency_rounds_ms = [t / 1.25 for t in rows[0].latency_rounds_ms]  # 1.25x in every round
    faster = findings(sqft, rows)[-3]
    assert faster.startswith("- [holds] LoNAS's heuristic subnetwork is smaller (80 vs 100 parameters) and faster")
    assert faster.endswith("(95% interval [1.25, 1.25])")
    noise = [0.8, 1.2, 0.9, 1.1] * 5
    rows[1].latency_rounds_ms = [t * f for t, f in zip(rows[0].latency_rounds_ms, noise, strict=True)]
    assert findings(sqft, rows)[-3].startswith("- [within noise] LoNAS's heuristic subnetwork is smaller")
    rows[1].params = 100  # not smaller: differs, whatever the speed
    assert findings(sqft, rows)[-3].startswith("- [differs] LoNAS's heuristic subnetwork is smaller (100 vs 100")
