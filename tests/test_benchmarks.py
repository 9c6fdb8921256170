"""The benchmark scripts run and write their section of a results file (no timing is asserted here)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEP_TIME = ROOT / "benchmarks" / "step_time.py"


@pytest.fixture(scope="module")
def step_time():
    spec = importlib.util.spec_from_file_location("benchmarks_step_time", STEP_TIME)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_step_time_quick_run_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nKept as it is.\n")
    args = ["--quick", "--rounds", "2", "--steps", "1", "--warmup", "0", "--results", str(results)]
    subprocess.run([sys.executable, str(STEP_TIME), *args], cwd=ROOT, check=True, capture_output=True, timeout=300)

    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nKept as it is.\n\n<!-- step_time:start -->\n")
    assert text.count("<!-- step_time:start -->") == text.count("<!-- step_time:end -->") == 1
    assert f"`python benchmarks/step_time.py {' '.join(args)}`" in text
    cells = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    rows = {row[0][2:]: (row[1], row[2], row[3]) for row in cells[1:]}
    # tiny Llama (2 layers, hidden 64, intermediate 128, 2 KV heads of 16), 7 target modules: 8192 adapter params per
    # layer at rank 8; the heuristic rank of [8, 6, 4] is 6
    assert rows == {
        "lora": ("8", "16,384", "2"),
        "elastic max": ("8", "16,384", "2"),
        "elastic heuristic": ("6", "12,288", "2"),
        "elastic min": ("4", "8,192", "2"),
    }
    assert "ratio vs LoRA" in text and ("meets the goal" in text or "misses the goal" in text)
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_section_replaces_only_its_own_section(step_time, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Results\n\nbefore\n\n{step_time.START}\nold\n{step_time.END}\n\nafter: other benchmark\n")
    step_time.write_section(path, f"{step_time.START}\nnew\n{step_time.END}\n")
    expected = f"# Results\n\nbefore\n\n{step_time.START}\nnew\n{step_time.END}\n\nafter: other benchmark\n"
    assert path.read_text() == expected


def test_write_section_creates_the_file(step_time, tmp_path):
    path = tmp_path / "sub" / "RESULTS.md"
    step_time.write_section(path, f"{step_time.START}\nnew\n{step_time.END}\n")
    assert path.read_text() == f"# Benchmark results\n\n{step_time.START}\nnew\n{step_time.END}\n"


def test_write_section_refuses_a_broken_section(step_time, tmp_path):
    path = tmp_path / "RESULTS.md"
    original = f"# Results\n\n{step_time.START}\nno end marker\n"
    path.write_text(original)
    with pytest.raises(RuntimeError, match="broken .* section; fix it by hand"):
        step_time.write_section(path, f"{step_time.START}\nnew\n{step_time.END}\n")
    assert path.read_text() == original


def test_sparse_peft_step_quick_run_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    script = ROOT / "benchmarks" / "sparse_peft_step.py"
    command = [sys.executable, str(script), "--quick", "--results", str(results)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = results.read_text()
    name = "sparse_peft_step_quick_seq32"
    assert f"<!-- {name}:start -->" in text and f"<!-- {name}:end -->" in text
    cells = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    names = [row[0][2:] for row in cells if row[0][2:] in ("lora", "sparse_peft", "reference")]
    assert names == ["lora", "sparse_peft", "reference"] * 2  # the timing table and the memory table
    # SparsePEFT and the reference formulation computed the same loss; LoRA's adapter has as many parameters
    assert "SparsePEFT and reference loss" in text and "equal" in text
    assert {row[2] for row in cells if row[0][2:] in names and len(row) > 8} == {"11,264"}
    for goal in ("sparse_peft / lora", "sparse_peft / reference", "peak memory sparse_peft / lora"):
        assert f"{goal} = " in text


def test_qa_sparse_peft_step_quick_run_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nKept as it is.\n")
    args = ["--quick", "--results", str(results)]
    command = [sys.executable, str(ROOT / "benchmarks" / "qa_sparse_peft_step.py"), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = results.read_text()
    name = "qa_sparse_peft_step_quick_seq32"
    assert text.startswith(f"# Benchmark results\n\nKept as it is.\n\n<!-- {name}:start -->\n")
    assert text.count(f"<!-- {name}:start -->") == text.count(f"<!-- {name}:end -->") == 1
    assert f"`python benchmarks/qa_sparse_peft_step.py {' '.join(args)}`" in text
    cells = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    rows = {row[0][2:]: (row[1], row[2], row[3]) for row in cells[1:]}
    # step_time's quick Llama (2 layers, hidden 64, intermediate 128, 2 KV heads of 16), rank 8 on the 7 projections:
    # 8192 adapter parameters per layer
    assert rows == {"lora": ("8", "16,384", "4"), "qa_sparse_peft": ("8", "16,384", "4")}
    # groups of 32 inputs (the model is narrower than 128); 14 GPTQ layers, 36,864 weights per block; the merge is
    # exact and writes qweight only
    assert "GPTQ 4-bit, group size 32, sym=False, desc_act=False: 14 layers, sparsity 50.00%" in text
    assert "into the 14 GPTQ layers (73,728 weights)" in text
    assert "per million parameters" in text
    assert "max |logits(QA-SparsePEFT) - logits(merged)| = 0 on" in text
    assert "qzeros, scales and g_idx bit-identical after the merge" in text
    assert "unmerge restored qweight exactly" in text
    assert "qa_sparse_peft / lora = " in text and ("meets the goal of <= 2.0" in text or "misses the goal" in text)


def quick_section(script: str, name: str, results) -> tuple[str, list[list[str]]]:
    """Run `benchmarks/<script> --quick --results <results>`; check that it wrote its section once, with the command
    that reproduces it; return the file's text and the cells of its table rows."""
    args = ["--quick", "--results", str(results)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = results.read_text()
    assert text.count(f"<!-- {name}:start -->") == text.count(f"<!-- {name}:end -->") == 1
    assert f"`python benchmarks/{script} {' '.join(args)}`" in text
    return text, [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]


def test_fsdp_memory_quick_run_halves_what_each_of_two_ranks_holds(tmp_path):
    text, cells = quick_section("fsdp_memory.py", "fsdp_memory", tmp_path / "RESULTS.md")
    rows = [row for row in cells if row[0] in ("| 1", "| 2")]
    # ranks, rank, frozen, adapters, gradients, AdamW, held, ratio, RSS: one process, then the two sharded ranks
    assert [row[:2] for row in rows] == [["| 1", "0"], ["| 2", "0"], ["| 2", "1"]]
    assert [row[7] for row in rows] == ["1.000", "0.500", "0.500"]
    # the quick model: 164,416 frozen and 45,056 adapter parameters (float32), halved by sharding
    assert "45,056 adapter\n  and 164,416 frozen parameters" in text
    assert [row[2:4] for row in rows] == [["0.6", "0.2"], ["0.3", "0.1"], ["0.3", "0.1"]]


def test_mode_b_export_quick_run_writes_its_section(tmp_path):
    text, cells = quick_section("mode_b_export.py", "mode_b_export_quick_seq128", tmp_path / "RESULTS.md")
    rows = {row[0][2:]: row[1:6] for row in cells[1:]}
    # quick Llama: hidden 64, intermediate 128, 4 heads over 2 KV heads of 16, 2 layers, vocab 128 (untied head);
    # widths [1.0, 0.75, 0.5] of 128 and heads [4, 2]: the heuristic keeps 96 channels and 4 heads
    assert rows == {
        "base": ["128", "4/2", "90,432", "73,984", "1.000"],
        "maximal": ["128", "4/2", "90,432", "73,984", "1.000"],
        "heuristic": ["96", "4/2", "78,144", "61,696", "0.834"],
        "minimal": ["64", "2/1", "53,568", "37,120", "0.502"],
    }
    assert "the cost model's parameter count equals the exported model's: yes" in text


def test_search_strategies_quick_run_writes_its_section(tmp_path):
    text, cells = quick_section("search_strategies.py", "search_strategies_quick", tmp_path / "RESULTS.md")
    assert [row[0][2:] for row in cells[1:]] == ["random", "nsga2", "tpe", "hill_climb"]
    # quick super-network: 2 layers x (5 rank groups + width + heads) = 14 groups; 3 choices each
    assert "14 groups, 4.78e+06 subnetworks" in text
    assert "Subnetwork switch: at most" in text and "Mean hypervolume:" in text


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama and a word tokenizer of the demo's task, saved as a folder: the real-model benchmarks' code paths
    (the benchmarks themselves run SmolLM2)."""
    from peft_elastic.demo.task import splits
    from peft_elastic.toy import tiny_llama, train_tokenizer

    folder = tmp_path_factory.mktemp("tiny") / "model"
    texts = [p["prompt"] + p["completion"] for p in splits(200, 10, 10)["train"]]
    tokenizer = train_tokenizer(texts, vocab_size=96, words=True)
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_int4(tiny_folder):
    """The tiny folder pruned to 50% by Wanda and quantized to GPTQ INT4 (groups of 32), with its sparsity mask."""
    from peft_elastic import quantize_gptq, save_sparsified, sparsify
    from peft_elastic.demo.base import load_base
    from peft_elastic.text import pydoc_texts

    model, tokenizer = load_base(tiny_folder)
    texts = pydoc_texts("calibration")[:4]
    report = sparsify(model, texts, "wanda", 0.5, tokenizer=tokenizer, max_length=64, progress=False)
    save_sparsified(model, tiny_folder.parent / "sparse", report, tokenizer)
    int4 = tiny_folder.parent / "int4"
    quantize_gptq(tiny_folder.parent / "sparse", int4, texts, group_size=32, tokenizer=tokenizer, max_length=64)
    return int4


def run_benchmark(name: str, args: list[str], results: Path) -> str:
    results.write_text("# Benchmark results\n\nKept as it is.\n")
    command = [sys.executable, str(ROOT / "benchmarks" / name), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = results.read_text()
    marker = name.removesuffix(".py")
    assert text.startswith(f"# Benchmark results\n\nKept as it is.\n\n<!-- {marker}:start -->\n")
    assert text.rstrip().endswith(f"<!-- {marker}:end -->")
    assert f"`python benchmarks/{name} {' '.join(args)}`" in text
    return text


def test_qa_threshold_quick_run_writes_its_section(tiny_folder, tmp_path):
    args = ["--quick", "--model", str(tiny_folder), "--work", str(tmp_path / "work"), "--results"]
    text = run_benchmark("qa_threshold.py", [*args, str(tmp_path / "R.md")], tmp_path / "R.md")
    assert "| learning rate | codes changed @ 1 | codes changed @ 2 | validation loss @ 2 |" in text
    rows = [line for line in text.splitlines() if line.startswith("| 0.0003 |")]
    assert len(rows) == 1 and rows[0].count("%") == 2


def test_profile_real_llm_quick_run_writes_its_section(tiny_folder, tiny_int4, tmp_path):
    args = ["--model", str(tiny_folder), "--int4", str(tiny_int4), "--rounds", "1", "--n-validation", "4", "--results"]
    text = run_benchmark("profile_real_llm.py", [*args, str(tmp_path / "R.md")], tmp_path / "R.md")
    assert "| LoRA step |" in text and "| 1.00x [1.00, 1.00] |" in text
    assert "| Mode B sandwich step (max, 2 random, min) |" in text
    assert "| reorder_by_importance (activation) |" in text
    assert "| heuristic subnetwork exported (smaller model) |" in text
    assert "| QA-SparsePEFT step (INT4 base) |" in text and "| SQFT step (SparsePEFT FP adapter, INT4 base) |" in text
    assert text.count("| operator | calls | self CPU ms | share |") == 3


def test_search_overhead_real_quick_run_writes_its_section(tiny_folder, tmp_path):
    args = ["--model", str(tiny_folder), "--trials", "4", "--results"]
    text = run_benchmark("search_overhead_real.py", [*args, str(tmp_path / "R.md")], tmp_path / "R.md")
    rows = [line for line in text.splitlines() if line.startswith(("| nsga2 |", "| tpe |"))]
    assert [row.split(" | ")[:3] for row in rows] == [["| nsga2", "macs", "4"], ["| tpe", "macs", "4"],
                                                      ["| nsga2", "latency", "4"]]  # fmt: skip
    assert all(row.endswith("% |") for row in rows)


def test_real_llm_quick_run_writes_its_section(tiny_folder, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nKept as it is.\n")
    args = [
        "--quick",
        "--model",
        str(tiny_folder),
        "--results",
        str(results),
        "--output",
        str(tmp_path / "out"),
    ]
    command = [sys.executable, str(ROOT / "benchmarks" / "real_llm.py"), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nKept as it is.\n\n<!-- real_llm:start -->\n")
    assert text.rstrip().endswith("<!-- real_llm:end -->")
    assert f"`python benchmarks/real_llm.py {' '.join(args)}`" in text
    assert "| LoRA merged, re-pruned to 50% |" in text and "| perplexity |" in text
    assert "-layer model: " in text and "evaluations in" in text and "% of the evaluations" in text
    steps = [line for line in text.splitlines() if line.startswith("| ") and "x [" in line]
    assert [line.split(" | ")[0] for line in steps] == [
        "| LoRA",
        "| Shears (NLS, random subnetwork)",
        "| SparsePEFT",
        "| Mode B super-network (sandwich: 4 subnetworks)",
        "| SQFT (NLS on the INT4 base)",
        "| QA-SparsePEFT (INT4 base)",
    ]
    assert steps[0].endswith("| 1.00x [1.00, 1.00] |")
    run_results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(claim in text for claim in run_results["findings"])
    assert all(row["perplexity"] > 1 for row in run_results["table2"] + run_results["table1"])
    assert "### Where the answers go wrong (test split)" in text
    rows = run_results["table2"] + run_results["table1"]
    assert all(row["anatomy"]["right"] <= row["accuracy"] for row in rows)  # right in the format, of the right

    # the section of the finished run, written again from its folder: the same text but for the date
    again = tmp_path / "AGAIN.md"
    rebuild = [sys.executable, str(ROOT / "benchmarks" / "real_llm.py"), "--from-output", str(tmp_path / "out")]
    result = subprocess.run([*rebuild, "--results", str(again)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    def undated(text):
        return re.sub(r"- Date: .*", "", text[text.index("<!-- real_llm:start -->") :])

    assert undated(again.read_text()) == undated(text)


def test_demo_robustness_quick_run_compares_two_code_paths(tmp_path):
    results, work = tmp_path / "RESULTS.md", tmp_path / "work"
    args = ["--quick", "--seeds", "0", "1", "--work", str(work), "--results", str(results)]
    command = [sys.executable, str(ROOT / "benchmarks" / "demo_robustness.py"), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = results.read_text()
    assert text.count("<!-- demo_robustness:start -->") == text.count("<!-- demo_robustness:end -->") == 1
    assert f"`python benchmarks/demo_robustness.py {' '.join(args)}`" in text
    lines = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    headers = [i for i, row in enumerate(lines) if row[0] == "| code path"]
    assert len(headers) == 2  # LoRA per seed; Table 2's SparsePEFT vs re-pruned LoRA per seed
    runs = [("native", "0"), ("native", "1"), ("portable", "0"), ("portable", "1")]
    assert [(row[0][2:], row[3]) for row in lines[headers[0] + 1 : headers[1]]] == runs
    gap_rows = lines[headers[1] + 1 :]
    assert [(row[0][2:], row[2]) for row in gap_rows] == runs
    for row in gap_rows:  # the gap column is SparsePEFT's accuracy minus re-pruned LoRA's, with its interval
        repruned, sparse_peft = (float(cell.rstrip("%")) for cell in row[4:6])
        assert float(row[6].split("%")[0]) == pytest.approx(sparse_peft - repruned, abs=0.06)
    assert re.search(r"SparsePEFT - re-pruned LoRA over 4 runs: mean [+-]\d+\.\d\d%, range", text)
    records = {p: json.loads((work / f"record-{p}.json").read_text()) for p in ("native", "portable")}
    # each path ran in its own process with its own switches: ATen itself reports the portable kernels
    assert records["portable"]["aten_capability"] == "DEFAULT" != records["native"]["aten_capability"]
    assert records["portable"]["environment"]["MKL_ENABLE_INSTRUCTIONS"] == "SSE4_2"
    assert records["native"]["environment"] == {}
    for record in records.values():
        assert (work / f"cache-{record['capability']}").is_dir()  # a base per code path
        assert len(record["dense"]) == 24 and all(len(hits) == 24 for hits in record["lora"].values())
        assert len(record["sparse"]) == 24
        for key in ("lora_sparse", "lora_repruned", "sparse_peft"):
            assert sorted(record[key]) == ["0", "1"] and all(len(hits) == 24 for hits in record[key].values())
    assert re.search(r"LoRA over 4 runs \(seeds x code paths\): mean \d+\.\d%, range", text)


def test_mode_b_training_quick_run_scores_each_variant_at_three_subnetworks(tmp_path):
    results = tmp_path / "RESULTS.md"
    args = ["--quick", "--variants", "demo", "fixed maximal", "--results", str(results)]
    command = [sys.executable, str(ROOT / "benchmarks" / "mode_b_training.py"), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = results.read_text()
    assert text.count("<!-- mode_b_training:start -->") == text.count("<!-- mode_b_training:end -->") == 1
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[0][2:] for row in rows] == ["lora", "demo", "fixed maximal"]  # LoRA added: the reference
    lora, demo = rows[0], rows[1]
    assert lora[3] == lora[4] == "-" and lora[5] == lora[6] == "-"  # LoRA has one network
    if lora[2].startswith("0.0%"):  # a ratio to nothing: not judged
        assert demo[3] == demo[4] == "-"
    else:
        assert re.match(r"\d+\.\d% \[", demo[3]) and demo[4] in ("holds", "differs", "within noise")
    assert all(re.match(r"\d+\.\d% \[\d+\.\d%, \d+\.\d%\]", cell) for cell in demo[2:3] + demo[5:7])


def _demo_results(findings: list[str], seconds: float = 600.0, cached: bool = True) -> dict:
    return {"settings": {"n_test": 500}, "findings": findings, "seconds": seconds, "base_was_cached": cached}


def test_demo_verdicts_lines_up_two_runs_claim_by_claim(tmp_path):
    a = [
        "- [holds] 50% Wanda sparsity costs accuracy without tuning (80.0% -> 44.2%). (95% interval [0.314, 0.406])",
        "- [holds] SparsePEFT merges without losing sparsity (50.0%); merging LoRA leaves 0.0%.",
        "- [within noise] Shears reaches 96.3% of LoRA's accuracy (the papers: 102.3%). (95% interval [0.944, 0.982])",
        "- [n/a] Search finds a subnetwork (both score 0 on validation and test: nothing to rank them by)",
    ]
    b = [a[0].replace("0.314", "0.300"), a[1], a[2].replace("within noise", "holds"), a[3]]
    paths = []
    for name, findings, cached in (("a", a, False), ("b", b, True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_demo_results(findings, cached=cached)))
        paths.append(f"{name}={tmp_path / name / 'results.json'}")
    results = tmp_path / "RESULTS.md"
    text = run_benchmark("demo_verdicts.py", [*paths, "--results", str(results)], results)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == ["| claim (as the first run words it)", "a", "b", "same |"]
    assert [row[1:] for row in rows[1:]] == [
        ["holds [0.314, 0.406]", "holds [0.300, 0.406]", "yes |"],
        ["holds", "holds", "yes |"],
        ["within noise [0.944, 0.982]", "holds [0.944, 0.982]", "**no** |"],
        ["n/a both score 0 on validation and test: nothing to rank them by"] * 2 + ["yes |"],
    ]
    assert rows[1][0] == "| 50% Wanda sparsity costs accuracy without tuning (80.0% -> 44.2%)."
    assert "Result: **some claims differ between the runs**." in text
    assert "a: 600 s (pre-training included); b: 600 s" in text


def test_demo_verdicts_refuses_runs_it_cannot_compare(tmp_path):
    script = ROOT / "benchmarks" / "demo_verdicts.py"
    one = tmp_path / "one.json"
    one.write_text(json.dumps(_demo_results(["- [holds] A claim."])))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**_demo_results(["- [holds] A claim."]), "settings": {"n_test": 24}}))
    cases = [
        ([f"a={one}", f"b={other}"], "The runs have different settings"),
        ([f"a={one}", f"{tmp_path / 'missing.json'}"], "Give each run as LABEL=path/to/results.json, got"),
        ([f"a={one}", f"b={tmp_path / 'missing.json'}"], "b: no results file at"),
        ([f"a={one}"], "give at least two runs to compare"),
    ]
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, str(script), *args, "--results", str(tmp_path / "R.md")],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-500:])
        assert not (tmp_path / "R.md").exists()
