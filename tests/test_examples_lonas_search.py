"""The LoNAS (Mode B), subnetwork-search and multi-process examples run end to end and say what they should: exact
parameter and MAC counts of the tiny model's subnetworks, a compressed model that is smaller and computes what the
super-network computed, a Pareto front that is one, exports that load, and two DDP ranks with identical adapters."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_elastic
from peft_elastic.search import SearchResult
from peft_elastic.toy import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# the examples' tiny Llama: hidden 96, 2 layers, 8 query heads over 4 key/value heads of 12 channels, MLP 192
HIDDEN, HEAD_DIM, LAYERS = 96, 12, 2


def environment() -> dict[str, str]:
    # the tree under test first on the path (whatever an installed copy points to); one thread per process: the
    # tiny model's matrices are small and the machine is shared
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "GPTQMODEL_CPU_WORKERS": "2",
        "PYTHONPATH": path,
    }


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment(), cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, str(EXAMPLES / name), *args], cwd)


def params(vocab: int, layers: list[tuple[int, int]]) -> int:
    """Parameters of a Llama with the examples' hidden size and `(query heads, MLP width)` per layer: untied embedding
    and LM head, final norm, and per layer two norms, q/k/v/o (key/value heads = query heads / 2) and gate/up/down."""
    per_layer = [2 * HIDDEN + HIDDEN * HEAD_DIM * 3 * heads + 3 * HIDDEN * width for heads, width in layers]
    return 2 * vocab * HIDDEN + HIDDEN + sum(per_layer)


def macs(vocab: int, heads: int, width: int, seq_len: int = 128) -> int:
    """MACs of one forward pass over `seq_len` tokens, every layer the same: linear layers (LM head included) and
    QKᵀ plus the weighted sum over the full score matrix."""
    linear = LAYERS * (HIDDEN * HEAD_DIM * 3 * heads + 3 * HIDDEN * width) + vocab * HIDDEN
    return seq_len * linear + LAYERS * 2 * seq_len**2 * heads * HEAD_DIM


def adapter_params(rank: int, heads: int, width: int) -> int:
    """LoRA parameters `rank · (in + out)` of q, k, v, o, gate, up, down at the active widths, every layer alike."""
    q, kv = heads * HEAD_DIM, heads // 2 * HEAD_DIM
    shapes = [(HIDDEN, q), (HIDDEN, kv), (HIDDEN, kv), (q, HIDDEN), (HIDDEN, width), (HIDDEN, width), (width, HIDDEN)]
    return LAYERS * rank * sum(a + b for a, b in shapes)


def group_choice(module: str, subnetwork: dict[str, int]) -> int:
    """The rank `subnetwork` gives `module` ("model.layers.0.self_attn.q_proj" is in group "...self_attn.q_proj+k_proj+
    v_proj")."""
    parent, _, leaf = module.rpartition(".")
    (choice,) = [
        c for g, c in subnetwork.items() if g.rpartition(".")[0] == parent and leaf in g.split(".")[-1].split("+")
    ]
    return choice


def check_front(result: SearchResult, front: list[dict]) -> None:
    """`front` is the non-dominated set of the complete trials, by strictly increasing cost and improving metric."""
    sign = 1 if result.direction == "minimize" else -1
    trials = result.complete()
    assert front and [t["number"] for t in front] == [t["number"] for t in result.pareto_front()]
    costs, metrics = [t["cost"] for t in front], [sign * t["metric"] for t in front]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert all(a > b for a, b in zip(metrics, metrics[1:], strict=False))
    for point in front:
        assert not any(
            t["cost"] <= point["cost"]
            and sign * t["metric"] <= sign * point["metric"]
            and (t["cost"], t["metric"]) != (point["cost"], point["metric"])
            for t in trials
        ), point
    for trial in trials:  # every trial is dominated by (or equal to) a point of the front
        assert any(p["cost"] <= trial["cost"] and sign * p["metric"] <= sign * trial["metric"] for p in front)


def check_best(result: SearchResult, best: dict, drop: float = 0.01) -> None:
    """`best` is the cheapest trial within `drop` of the maximal subnetwork's metric."""
    reference = result.reference["metric"]
    if result.direction == "minimize":
        within = [t for t in result.complete() if t["metric"] <= reference + abs(reference) * drop]
    else:
        within = [t for t in result.complete() if t["metric"] >= reference - abs(reference) * drop]
    assert best["number"] in {t["number"] for t in within}
    assert best["cost"] == min(t["cost"] for t in within)


# ------------------------------------------------------------------------------------------------ LoNAS (Mode B)


@pytest.fixture(scope="module")
def lonas(tmp_path_factory):
    """One run of the LoNAS example (6 steps), shared by its test and the search test that reuses its adapter."""
    out = tmp_path_factory.mktemp("lonas")
    result = example("lonas_mode_b.py", "--steps", "6", "--output-dir", str(out / "out"), cwd=out)
    return out / "out", json.loads((out / "out" / "figures.json").read_text()), result.stdout


def test_lonas_mode_b_example(lonas):
    out, figures, stdout = lonas
    vocab = json.loads((out / "heuristic-model" / "config.json").read_text())["vocab_size"]
    # 2 layers x (q/k/v rank, o rank, gate rank, up rank, down rank, MLP width, heads) = 14 groups
    assert figures["groups"] == 14
    assert figures["reorder_max_logit_diff"] < 1e-5  # the importance ordering is a permutation
    # (rank, heads, MLP width): the maximal subnetwork is the base's size; the heuristic takes each group's middle
    # choice; the minimal the smallest
    sizes = {"maximal": (8, 8, 192), "heuristic": (6, 6, 144), "minimal": (4, 4, 96)}
    assert figures["base"]["params"] == params(vocab, [(8, 192)] * LAYERS)
    assert figures["base"]["macs"] == macs(vocab, 8, 192)
    table = {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.split()}
    for name, (rank, heads, width) in sizes.items():
        row = figures[name]
        assert (row["heads"], row["mlp_width"]) == ([heads], [width])
        assert row["params"] == params(vocab, [(heads, width)] * LAYERS), name
        assert row["macs"] == macs(vocab, heads, width), name
        assert row["adapter_params"] == adapter_params(rank, heads, width), name
        assert row["loss"] < figures["base"]["loss"], (name, figures)  # 6 steps already help every subnetwork
        assert table[name][3:] == [f"{row['params']:,}", f"{row['macs']:,}", f"{row['adapter_params']:,}"]
    assert figures["minimal"]["params"] < figures["heuristic"]["params"] < figures["maximal"]["params"]

    # the heuristic subnetwork as a standard, physically smaller checkpoint
    compressed = figures["compressed"]
    assert compressed["params"] == figures["heuristic"]["params"] == params(vocab, [(6, 144)] * LAYERS)
    assert compressed["params"] < figures["base"]["params"]
    assert (compressed["intermediate_size"], compressed["num_attention_heads"], compressed["num_key_value_heads"]) == (
        144,
        6,
        3,
    )
    assert not compressed["per_module_shapes"]
    assert compressed["max_logit_diff"] < 1e-4 and compressed["auto_max_logit_diff"] < 1e-4
    small = AutoModelForCausalLM.from_pretrained(out / "heuristic-model")  # without peft_elastic's loader
    assert sum(p.numel() for p in small.parameters()) == compressed["params"]
    assert small.model.layers[1].self_attn.k_proj.weight.shape == (3 * HEAD_DIM, HIDDEN)
    assert small.model.layers[0].mlp.down_proj.weight.shape == (HIDDEN, 144)
    base = AutoModelForCausalLM.from_pretrained(out / "reordered-base")
    assert sum(p.numel() for p in base.parameters()) == figures["base"]["params"]
    assert AutoTokenizer.from_pretrained(out / "heuristic-model").vocab_size == vocab

    config = json.loads((out / "super-adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ELASTIC_LORA" and config["rank_choices"] == [8, 6, 4]
    assert config["width_choices"] == config["head_choices"] == [1.0, 0.75, 0.5]


# ------------------------------------------------------------------------------------------------ search


def test_search_mode_b_on_the_lonas_super_adapter(lonas, tmp_path):
    """Search the adapter the LoNAS example trained (on its ordered base), export the chosen subnetwork."""
    trained, lonas_figures, _ = lonas
    out = tmp_path / "search"
    args = ["--model", str(trained / "reordered-base"), "--adapter", str(trained / "super-adapter")]
    example("search_subnetwork.py", *args, "--trials", "12", "--output-dir", str(out), cwd=tmp_path)
    figures = json.loads((out / "figures.json").read_text())
    assert (figures["mode"], figures["cost"], figures["metric"], figures["strategy"]) == (
        "B",
        "params",
        "loss",
        "nsga2",
    )
    result = SearchResult.load(out / "result.json")
    assert figures["trials"] == len(result.trials) == 12 and all(t["state"] == "complete" for t in result.trials)
    # the search starts with the maximal, heuristic and minimal subnetworks: their costs are the LoNAS example's
    assert [t["cost"] for t in result.trials[:3]] == [
        lonas_figures[n]["params"] for n in ("maximal", "heuristic", "minimal")
    ]

    front = json.loads((out / "pareto_front.json").read_text())
    check_front(result, front)
    assert [p["number"] for p in figures["front"]] == [p["number"] for p in front]
    best = json.loads((out / "best.json").read_text())
    assert figures["best"] == {k: best[k] for k in ("number", "metric", "cost", "subnetwork")}
    check_best(result, best)

    # the chosen subnetwork as a smaller model: the widths of each layer, the exact parameter count (= its cost)
    chosen = best["subnetwork"]
    layers = [(chosen[f"model.layers.{i}.self_attn:heads"], chosen[f"model.layers.{i}.mlp:width"]) for i in range(2)]
    vocab = json.loads((trained / "reordered-base" / "config.json").read_text())["vocab_size"]
    assert figures["export_params"] == best["cost"] == params(vocab, layers)
    small = peft_elastic.load_compressed_model(out / "best-model")
    assert sum(p.numel() for p in small.parameters()) == best["cost"]
    for layer, (heads, width) in zip(small.model.layers, layers, strict=True):
        assert layer.self_attn.q_proj.out_features == heads * HEAD_DIM
        assert layer.self_attn.v_proj.out_features == heads // 2 * HEAD_DIM
        assert layer.mlp.down_proj.in_features == width
    assert figures["export_max_logit_diff"] < 1e-4
    assert set(figures["test"]) == {"maximal", "heuristic", "best"}
    assert (out / "search.png").stat().st_size > 0


def test_search_mode_a_trains_and_exports_a_stock_lora(tmp_path):
    """Mode A (ranks only): train here, search exact match vs adapter parameters, export a stock LoRA adapter."""
    out = tmp_path / "search"
    args = ["--mode", "A", "--steps", "4", "--trials", "8", "--strategy", "tpe", "--metric", "exact_match"]
    example("search_subnetwork.py", *args, "--output-dir", str(out), cwd=tmp_path)
    figures = json.loads((out / "figures.json").read_text())
    assert (figures["mode"], figures["cost"], figures["metric"]) == ("A", "adapter_params", "exact_match")
    result = SearchResult.load(out / "result.json")
    assert result.direction == "maximize" and len(result.trials) == 8
    assert all(0 <= t["metric"] <= 1 for t in result.complete())
    # q/k/v/o/gate/up/down of 2 layers at full widths: 1,536 adapter parameters per rank and layer
    assert (
        [t["cost"] for t in result.trials[:3]]
        == [adapter_params(r, 8, 192) for r in (8, 6, 4)]
        == [24576, 18432, 12288]
    )
    front = json.loads((out / "pareto_front.json").read_text())
    check_front(result, front)
    best = json.loads((out / "best.json").read_text())
    check_best(result, best)

    config = json.loads((out / "best-lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert len(config["rank_pattern"]) == 14  # 7 modules x 2 layers
    for module, rank in config["rank_pattern"].items():
        assert rank == group_choice(module, best["subnetwork"]), module
        assert config["alpha_pattern"][module] / rank == 16 / 8  # the super-adapter's scaling alpha / r_max
    assert figures["export_max_logit_diff"] < 1e-5
    super_config = json.loads((out / "super-adapter" / "adapter_config.json").read_text())
    assert super_config["peft_type"] == "ELASTIC_LORA" and super_config["width_choices"] is None


# ------------------------------------------------------------------------------------------------ DDP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checksum(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_multi_gpu_example_with_two_ddp_ranks(tmp_path):
    """`torchrun --nproc_per_node 2` on CPU (gloo): two ranks, trained on different shards, end with the same
    adapter, which rank 0 saved and which loads."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), str(EXAMPLES / "multi_gpu.py"), "--steps", "3"]
    run([*command, "--output-dir", str(out)], tmp_path)
    ranks = [json.loads((out / "ranks" / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(r["rank"], r["world_size"], r["backend"]) for r in ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert ranks[0]["adapter_sha256"] == ranks[1]["adapter_sha256"]
    figures = json.loads((out / "figures.json").read_text())
    assert figures["world_size"] == 2 and figures["global_batch_size"] == 16 and figures["ranks_agree"]
    assert figures["adapter_sha256"] == [r["adapter_sha256"] for r in ranks]
    for name in ("maximal", "heuristic", "minimal"):
        assert figures[name] < figures["base"], (name, figures)

    # the saved adapter is the ranks' adapter, and loads (tokenizer saved with it) onto the examples' tiny Llama
    saved = load_file(out / "super-adapter" / "adapter_model.safetensors")
    assert checksum(saved) == ranks[0]["adapter_sha256"]
    assert all(torch.count_nonzero(t) > 0 for n, t in saved.items() if "lora_B" in n)  # trained
    tokenizer = AutoTokenizer.from_pretrained(out / "super-adapter")
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        tiny_llama(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192), out / "super-adapter"
    )
    space = peft_elastic.search_space(model)
    assert len(space) == 6 and all(choices == [8, 6, 4] for choices in space.values())  # [qkv], [up], [down] x 2
    stock = json.loads((out / "heuristic-lora" / "adapter_config.json").read_text())
    assert stock["peft_type"] == "LORA" and set(stock["rank_pattern"].values()) == {6}


# ------------------------------------------------------------------------------------------------ arguments


def test_bad_argument_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "search_subnetwork.py"), "--mode", "A", "--cost", "params"],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment(),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [
        "search_subnetwork.py: error: --cost params is the same for every Mode A subnetwork (ranks only); use "
        "adapter_params"
    ]
    assert not list(tmp_path.iterdir())  # nothing written


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("lonas_mode_b.py", ["--steps", "0"], "--steps must be at least 1, got 0"),
        ("lonas_mode_b.py", ["--strategy", "grid_params"], "invalid choice: 'grid_params'"),
        ("search_subnetwork.py", ["--trials", "0"], "--trials must be at least 1, got 0"),
        ("search_subnetwork.py", ["--max-metric-drop", "1.5"], "--max-metric-drop is a relative drop in [0, 1)"),
        ("search_subnetwork.py", ["--adapter", "nowhere"], "--adapter 'nowhere' is not an adapter folder"),
        ("multi_gpu.py", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        ("fsdp.py", ["--steps", "0"], "--steps must be at least 1, got 0"),
        ("fsdp.py", ["--learning-rate", "0"], "--learning-rate must be positive, got 0.0"),
        ("fsdp.py", ["--tuner", "lora"], "invalid choice: 'lora'"),
    ],
)
def test_arguments_are_validated(name, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_example(name).parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
