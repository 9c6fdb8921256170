"""sparsify: Wanda scores against a direct recomputation, exact per-row and N:M patterns, sequential calibration,
calibration data forms, the report, saving, and errors."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import peft_elastic
from peft_elastic.sparsity import keep_mask, parse_pattern
from peft_elastic.toy import tiny_llama, train_tokenizer

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LINEARS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def calibration(n: int = 6, seq: int = 12, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (seq,), generator=generator) for _ in range(n)]


def block_inputs_by_hand(model, data, block_index: int, module: str) -> torch.Tensor:
    """The inputs (tokens × in) that `module` of block `block_index` sees when the whole model runs on `data`."""
    seen = []
    layer = model.model.layers[block_index].get_submodule(module)
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for ids in data:
            model(ids[None])
    handle.remove()
    return torch.cat(seen)


def test_wanda_equals_a_direct_recomputation_of_the_scores():
    data = calibration()
    model, reference = tiny_llama(), tiny_llama()
    report = peft_elastic.sparsify(model, data, method="wanda", sparsity=0.5, progress=False)

    # block 0 sees the unpruned embeddings; block 1 sees the outputs of the *pruned* block 0: reproduce both by
    # pruning the reference by hand, block by block, each from the inputs of the model pruned so far
    for block in range(2):
        inputs = {name: block_inputs_by_hand(reference, data, block, name) for name in LINEARS}
        # inputs of later modules of the block depend on earlier ones being pruned: Wanda measures all the block's
        # inputs in one pass over the unpruned block, then prunes it; so do we here
        for name in LINEARS:
            layer = reference.model.layers[block].get_submodule(name)
            weight = layer.weight.data
            norms = inputs[name].double().pow(2).sum(0).sqrt().float()
            scores = weight.abs() * norms[None, :]
            prune = int(weight.shape[1] * 0.5)
            lowest = scores.argsort(dim=1, stable=True)[:, :prune]
            weight.scatter_(1, lowest, 0.0)
        for name in LINEARS:
            ours = model.model.layers[block].get_submodule(name).weight
            theirs = reference.model.layers[block].get_submodule(name).weight
            assert torch.equal(ours == 0, theirs == 0), (block, name)
            assert torch.equal(ours, theirs), (block, name)
    assert report.sparsity == 0.5
    assert set(report.modules) == {f"model.layers.{b}.{n}" for b in range(2) for n in LINEARS}


def test_wanda_is_not_magnitude():
    data = calibration()
    wanda, magnitude = tiny_llama(), tiny_llama()
    peft_elastic.sparsify(wanda, data, "wanda", 0.5, progress=False)
    peft_elastic.sparsify(magnitude, None, "magnitude", 0.5, progress=False)
    for name in LINEARS:  # the activation norms change which weights go (measured: 5-30 % of the weights differ)
        a = wanda.model.layers[1].get_submodule(name).weight == 0
        b = magnitude.model.layers[1].get_submodule(name).weight == 0
        assert (a != b).float().mean() > 0.02, name
    # magnitude: within each row exactly the smallest |W| are zero
    original = tiny_llama().model.layers[0].mlp.down_proj.weight
    pruned = magnitude.model.layers[0].mlp.down_proj.weight
    threshold = original.abs().sort(dim=1).values[:, original.shape[1] // 2 - 1 : original.shape[1] // 2]
    assert torch.equal(pruned == 0, original.abs() <= threshold)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_exact_per_row_sparsity(sparsity):
    model = tiny_llama()
    report = peft_elastic.sparsify(model, calibration(3), "wanda", sparsity, progress=False)
    for block in model.model.layers:
        for name in LINEARS:
            weight = block.get_submodule(name).weight
            per_row = (weight == 0).sum(dim=1)
            assert (per_row == int(weight.shape[1] * sparsity)).all(), name
    # embeddings and head untouched
    assert torch.equal(model.model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, tiny_llama().lm_head.weight)
    for name, (zeros, total) in report.modules.items():
        weight = model.get_submodule(name).weight
        assert (zeros, total) == (weight.shape[0] * int(weight.shape[1] * sparsity), weight.numel()), name


@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_n_m_pattern_is_exact(pattern, n, m):
    model = tiny_llama()
    report = peft_elastic.sparsify(model, calibration(3), "wanda", None, pattern=pattern, progress=False)
    assert report.pattern == pattern and report.target_sparsity == (m - n) / m
    for block in model.model.layers:
        for name in LINEARS:
            weight = block.get_submodule(name).weight
            groups = weight.reshape(weight.shape[0], -1, m)
            assert ((groups != 0).sum(dim=-1) == n).all(), name  # random float weights are never exactly zero
    assert report.sparsity == (m - n) / m


def test_keep_mask_breaks_ties_towards_lower_indices():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, 2.0, 2.0, 0.0]])
    assert keep_mask(scores, parse_pattern("2:4", None)).tolist() == [
        [True, True, False, False] + [True, True, False, False]
    ]
    assert keep_mask(scores, parse_pattern("unstructured", 0.5)).tolist() == [
        [False, False, False, True, True, True, True, False]
    ]


def test_attention_mask_zeros_are_left_out_of_the_norms():
    padded = [
        {
            "input_ids": torch.cat([ids, torch.full((5,), 7)]),  # pads with a non-zero embedding
            "attention_mask": torch.tensor([1] * 12 + [0] * 5),
        }
        for ids in calibration(4)
    ]
    a, b = tiny_llama(), tiny_llama()
    peft_elastic.sparsify(a, padded, "wanda", 0.5, progress=False)
    # same as calibrating on the first 12 tokens only, for block 0 (later blocks see attention to pads masked too)
    peft_elastic.sparsify(b, [p["input_ids"][:12] for p in padded], "wanda", 0.5, progress=False)
    assert torch.equal(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)
    c = tiny_llama()
    peft_elastic.sparsify(c, [p["input_ids"] for p in padded], "wanda", 0.5, progress=False)  # pads counted
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight)


def test_calibration_data_forms_agree():
    data = calibration(4)
    texts = [" ".join(str(int(t)) for t in ids) for ids in data]
    tokenizer = train_tokenizer(texts, vocab_size=96)
    encoded = [tokenizer(t, return_tensors="pt")["input_ids"][0] for t in texts]
    results = []
    for form in (
        encoded,
        [{"input_ids": ids} for ids in encoded],
        torch.stack(encoded) if len({len(e) for e in encoded}) == 1 else encoded,
        Dataset.from_dict({"input_ids": [e.tolist() for e in encoded]}),
        Dataset.from_dict({"text": texts}),
        texts,
    ):
        model = tiny_llama()
        peft_elastic.sparsify(model, form, "wanda", 0.5, tokenizer=tokenizer, progress=False)
        results.append(model.model.layers[1].mlp.down_proj.weight.clone())
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_gpt2_conv1d_blocks_are_found_and_pruned():
    config = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    report = peft_elastic.sparsify(model, calibration(3), "wanda", 0.5, progress=False)
    assert sorted(report.modules) == sorted(
        f"transformer.h.{b}.{n}" for b in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    weight = model.transformer.h[0].mlp.c_fc.weight  # Conv1D: (in, out); rows of the (out x in) view are columns
    assert ((weight == 0).sum(dim=0) == weight.shape[0] // 2).all()


def test_report_and_save(tmp_path):
    model = tiny_llama()
    report = peft_elastic.sparsify(model, calibration(3), "wanda", 0.5, progress=False)
    assert str(report).startswith("wanda (unstructured, target 50.00%): 50.00% zeros")
    assert peft_elastic.measure_sparsity(model).modules == report.modules
    peft_elastic.save_sparsified(model, tmp_path / "sparse", report)
    saved = json.loads((tmp_path / "sparse" / "sparsity_report.json").read_text())
    assert peft_elastic.SparsityReport.from_dict(saved).modules == report.modules
    weights = load_file(tmp_path / "sparse" / "model.safetensors")
    assert torch.equal(weights["model.layers.1.mlp.up_proj.weight"], model.model.layers[1].mlp.up_proj.weight)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    assert peft_elastic.measure_sparsity(again).modules == report.modules
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_save_sparsified_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    """As the other exports: a folder of files that belong together is new, or replaced whole (issue 21, point 6).
    Before, a stale file of an earlier save (a second shard, an old report) stayed beside the new model."""
    model = tiny_llama()
    report = peft_elastic.sparsify(model, None, "magnitude", 0.5, progress=False)
    target = tmp_path / "sparse"
    target.mkdir()
    (target / "model-00002-of-00002.safetensors").write_text("stale")
    with pytest.raises(
        ValueError, match=r"is not empty \(it holds model-00002-of-00002.safetensors\).*overwrite=True"
    ):
        peft_elastic.save_sparsified(model, target, report)
    assert sorted(p.name for p in target.iterdir()) == ["model-00002-of-00002.safetensors"]  # untouched
    peft_elastic.save_sparsified(model, target, report, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                        "sparsity_report.json"]  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_skip_modules_stay_dense():
    model = tiny_llama()
    report = peft_elastic.sparsify(model, None, "magnitude", 0.5, skip_modules=("o_proj", "down_proj"), progress=False)
    assert not any(name.endswith(("o_proj", "down_proj")) for name in report.modules)
    assert (model.model.layers[0].self_attn.o_proj.weight == 0).sum() == 0
    assert (model.model.layers[0].self_attn.q_proj.weight == 0).float().mean() == 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\) .* got 1.0"),
        ({"sparsity": -0.1}, r"sparsity must be a number in \[0, 1\) .* got -0.1"),
        ({"sparsity": "half"}, r"sparsity must be a number in \[0, 1\) .* got 'half'"),
        (
            {"pattern": "4:4", "sparsity": None},
            r"pattern '4:4': N:M keeps N of every M weights, so it needs 0 < N < M",
        ),
        ({"pattern": "5:4", "sparsity": None}, "needs 0 < N < M"),
        ({"pattern": "2:4", "sparsity": 0.3}, r"pattern '2:4' zeroes 0.5 of the weights, but sparsity=0.3"),
        (
            {"pattern": "structured", "sparsity": 0.5},
            r"pattern must be 'unstructured' or 'N:M' such as '2:4', got 'structured'",
        ),
        ({"method": "sparsegpt"}, r"Unknown pruning method 'sparsegpt'; use one of \['wanda', 'magnitude'\]"),
        ({"pattern": "2:3", "sparsity": None}, r"in_features=64, not divisible by M=3; skip it with skip_modules="),
    ],
)
def test_bad_arguments(kwargs, message):
    model = tiny_llama()
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ValueError, match=message):
        peft_elastic.sparsify(model, calibration(2), **{"method": "wanda", "sparsity": 0.5, **kwargs}, progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)  # nothing was pruned


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "calibration_data is None; Wanda needs calibration inputs"),
        ([], "calibration_data is empty"),
        ("some text", "calibration_data must be an iterable of input_ids tensors or dicts"),
        (42, "calibration_data must be an iterable .* got int"),
        ([3.5], r"calibration_data\[0\] is a float"),
        ([torch.rand(4, 5)], r"calibration_data\[0\]: input_ids must be a non-empty integer tensor"),
        ([{"ids": torch.ones(4, dtype=torch.long)}], r"calibration_data\[0\] is a dict without 'input_ids'"),
        (["text"], r"calibration_data\[0\] is text; pass tokenizer="),
        (Dataset.from_dict({"content": ["a"]}), r"no 'input_ids' and no 'text' column .* pass text_column="),
    ],
)
def test_bad_calibration_data(data, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        peft_elastic.sparsify(model, data, "wanda", 0.5, progress=False)
    assert peft_elastic.measure_sparsity(model).sparsity == 0


def _tiny(config_cls_name: str, **kwargs):
    import transformers

    config = getattr(transformers, config_cls_name)(**kwargs)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    ("model_fn", "prefix", "linears"),
    [
        (
            lambda: _tiny(
                "MistralConfig",
                vocab_size=96,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            ),
            "model.layers",
            7,
        ),
        (
            lambda: _tiny(
                "Qwen2Config",
                vocab_size=96,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            ),
            "model.layers",
            7,
        ),
        (
            lambda: _tiny(
                "OPTConfig",
                vocab_size=96,
                hidden_size=64,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=64,
                max_position_embeddings=64,
            ),
            "model.decoder.layers",
            6,
        ),
        (
            lambda: _tiny(
                "GPTNeoXConfig",
                vocab_size=96,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            ),
            "gpt_neox.layers",
            4,
        ),
    ],
    ids=["mistral", "qwen2", "opt", "gpt_neox"],
)
def test_other_decoder_architectures(model_fn, prefix, linears):
    model = model_fn()
    report = peft_elastic.sparsify(model, calibration(3), "wanda", 0.5, progress=False)
    assert len(report.modules) == 2 * linears
    assert all(name.startswith(f"{prefix}.") for name in report.modules)
    for name in report.modules:
        weight = model.get_submodule(name).weight
        assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all(), name
    with torch.no_grad():
        assert torch.isfinite(model(calibration(1)[0][None]).logits).all()
    # the activations were really measured: Wanda's pattern is not magnitude's
    magnitude = model_fn()
    peft_elastic.sparsify(magnitude, None, "magnitude", 0.5, progress=False)
    differs = [
        (model.get_submodule(n).weight == 0) != (magnitude.get_submodule(n).weight == 0) for n in report.modules
    ]
    assert sum(float(d.float().mean()) for d in differs) / len(differs) > 0.02
