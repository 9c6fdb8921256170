"""Super-network training with the transformers Trainer and TRL's SFTTrainer: per-step sampling, gradient
accumulation, determinism, resume, sandwich gradients, gradient checkpointing, evaluation and errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TARGETS, randomize_lora_b
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

import peft_elastic
from peft_elastic import NLSConfig
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import (
    ElasticTrainer,
    RandomSampler,
    SandwichSampler,
    SubnetworkSamplingCallback,
)

SEQ, N_EXAMPLES = 12, 32
SHEARS_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def nls_model(seed_b: int | None = 1):
    torch.manual_seed(0)  # the A initialisation draws from the global generator
    model = get_peft_model(tiny_llama(), NLSConfig(r=8, lora_alpha=16, rank_choices=[8, 6, 4], target_modules=TARGETS))
    if seed_b is not None:  # B starts at zero: random B makes the A gradients non-zero too
        randomize_lora_b(model, std=0.1, seed=seed_b)
    return model


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length random token sequences (labels = input ids, no padding)."""

    def __init__(self, n: int = N_EXAMPLES, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 96, (n, SEQ), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


EVAL = TokenDataset(8, seed=1)


def arguments(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**defaults, **kwargs})


class Recorder:
    """Records, at every forward of the trained model in training mode, the global step and the active subnetwork."""

    def __init__(self, model, trainer):
        self.calls: list[tuple[int, dict[str, int]]] = []
        model.register_forward_pre_hook(self._hook)
        self.model, self.trainer = model, trainer

    def _hook(self, module, args):
        if module.training:
            self.calls.append((self.trainer.state.global_step, peft_elastic.get_subnetwork(self.model)))

    def by_step(self) -> dict[int, list[dict[str, int]]]:
        steps: dict[int, list[dict[str, int]]] = {}
        for step, subnetwork in self.calls:
            steps.setdefault(step, []).append(subnetwork)
        return steps


def sampling_callback(trainer) -> SubnetworkSamplingCallback:
    (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SubnetworkSamplingCallback)]
    return callback


def expected_sequence(model, sampler, steps: int, max_steps: int):
    sampler.setup(model)
    return [sampler.sample(step, max_steps) for step in range(steps)]


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def train(tmp_path, model=None, callback=None, trainer_cls=Trainer, eval_dataset=None, **kwargs):
    model = nls_model() if model is None else model
    callback = SubnetworkSamplingCallback("random", seed=0) if callback is None else callback
    trainer = trainer_cls(
        model=model,
        args=arguments(tmp_path, **kwargs),
        train_dataset=TokenDataset(),
        eval_dataset=eval_dataset,
        callbacks=[callback],
    )
    recorder = Recorder(model, trainer)
    return trainer, recorder


# ---------------------------------------------------------------------------------------------- the flow


def test_sft_trainer_flow_with_nls_config(tmp_path):
    problems = arithmetic_problems(48)
    tok = train_tokenizer([p["prompt"] + p["completion"] for p in problems], vocab_size=96)
    ds = Dataset.from_list([{"text": p["prompt"] + p["completion"]} for p in problems])
    base = tiny_llama(vocab_size=len(tok))
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=32,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=base,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=NLSConfig(
            r=8,
            lora_alpha=16,
            rank_choices=[8, 6, 4],
            target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        ),
        callbacks=[SubnetworkSamplingCallback(strategy="random", seed=0)],
    )
    recorder = Recorder(trainer.model, trainer)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))

    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "NLS" and config["rank_choices"] == [8, 6, 4]
    # one subnetwork per optimizer step, the one the seeded sampler gives for that step
    expected = expected_sequence(trainer.model, RandomSampler(seed=0), 4, 4)
    assert recorder.by_step() == {step: expected[step] for step in range(4)}
    assert len({json.dumps(s[0], sort_keys=True) for s in expected}) > 1
    # after training the model holds the evaluation subnetwork (maximal), and so does the saved adapter
    maximal = peft_elastic.maximal_subnetwork(trainer.model)
    assert peft_elastic.get_subnetwork(trainer.model) == maximal
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry, steps in zip(logs, (expected[0:2], expected[2:4]), strict=True):
        params = [peft_elastic.num_adapter_parameters(trainer.model, s[0]) for s in steps]
        assert entry["subnetwork_params"] == pytest.approx(sum(params) / 2, abs=0.1)
        assert entry["subnetwork_params_ratio"] == pytest.approx(
            sum(params) / 2 / peft_elastic.num_adapter_parameters(trainer.model, maximal), abs=1e-4
        )

    again = PeftModel.from_pretrained(tiny_llama(vocab_size=len(tok)), tmp_path / "out")
    assert isinstance(again.peft_config["default"], NLSConfig)
    assert peft_elastic.get_subnetwork(again) == maximal
    # (compare weights: SFTConfig defaults to bf16, and accelerate wraps the trained model's forward in autocast)
    trained, reloaded = adapter_weights(trainer.model), adapter_weights(again)
    assert sorted(trained) == sorted(reloaded) and len(trained) == 20
    assert all(torch.equal(trained[name], reloaded[name]) for name in trained)
    assert any(torch.count_nonzero(w) for n, w in trained.items() if "lora_B" in n)  # it did train


# ------------------------------------------------------------------------------- sampling and accumulation


def test_one_subnetwork_per_optimizer_step_across_accumulation(tmp_path):
    trainer, recorder = train(tmp_path, max_steps=5, gradient_accumulation_steps=3)
    trainer.train()
    by_step = recorder.by_step()
    expected = expected_sequence(trainer.model, RandomSampler(seed=0), 5, 5)
    assert sorted(by_step) == [0, 1, 2, 3, 4]
    for step, subnetworks in by_step.items():
        assert subnetworks == [expected[step][0]] * 3, step  # the same for all three micro-batches
    assert len({json.dumps(s[0], sort_keys=True) for s in expected}) > 1


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    runs = []
    for i, seed in enumerate((7, 7, 8)):
        trainer, recorder = train(tmp_path / str(i), callback=SubnetworkSamplingCallback("random", seed=seed))
        trainer.train()
        runs.append((recorder.calls, adapter_weights(trainer.model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][name], runs[1][1][name]) for name in runs[0][1])
    assert runs[0][0] != runs[2][0]


@pytest.mark.parametrize("strategy", ["random", "grid_params"])
def test_resume_from_checkpoint_continues_the_sequence(tmp_path, strategy):
    options = {"bins": 4, "candidates": 4} if strategy == "grid_params" else {}
    full, full_recorder = train(
        tmp_path / "full",
        callback=SubnetworkSamplingCallback(strategy, seed=3, **options),
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
    )
    full.train()
    checkpoint = tmp_path / "full" / "run" / "checkpoint-3"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["SubnetworkSamplingCallback"]["args"]["strategy"] == strategy
    if strategy == "grid_params":
        grid = saved["SubnetworkSamplingCallback"]["attributes"]["sampler_state"]["grid"]
        assert grid == sampling_callback(full).sampler.grid

    # a new process would rebuild everything: a fresh model (other adapter weights) and callback
    resumed_model = nls_model(seed_b=99)
    resumed, resumed_recorder = train(
        tmp_path / "resumed",
        model=resumed_model,
        callback=SubnetworkSamplingCallback(strategy, seed=3, **options),
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert [step for step, _ in resumed_recorder.calls] == [3, 4, 5]
    assert resumed_recorder.calls == full_recorder.calls[3:]
    if strategy == "grid_params":
        assert sampling_callback(resumed).sampler.grid == grid
    final, again = adapter_weights(full.model), adapter_weights(resumed.model)
    for name in final:
        torch.testing.assert_close(again[name], final[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_with_restored_callback_state_keeps_the_trainer_support(tmp_path):
    # restore_callback_states_from_checkpoint=True makes the Trainer replace the callback by a new instance
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=2, restore_callback_states_from_checkpoint=True)
    full, full_recorder = train(
        tmp_path / "full",
        callback=SubnetworkSamplingCallback("sandwich", seed=5),
        trainer_cls=ElasticTrainer,
        **kwargs,
    )
    full.train()
    resumed, resumed_recorder = train(
        tmp_path / "resumed",
        model=nls_model(seed_b=99),
        callback=SubnetworkSamplingCallback("sandwich", seed=5),
        trainer_cls=ElasticTrainer,
        **kwargs,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "run" / "checkpoint-2"))
    assert sampling_callback(resumed)._trainer is resumed
    assert [step for step, _ in resumed_recorder.calls] == [2, 2, 2, 3, 3, 3]  # three passes per step
    assert resumed_recorder.calls == full_recorder.calls[6:]


# ------------------------------------------------------------------------------------------ sandwich gradients


class GradientCatcher(TrainerCallback):
    """Copies the adapter gradients the optimizer is about to apply (the first step's only)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class BatchRecordingTrainer(ElasticTrainer):
    """Keeps a copy of every micro-batch it trains on."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches = getattr(self, "batches", []) + [{k: v.clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch)


def first_step_gradients(tmp_path, callback, **kwargs):
    """The adapter gradients the optimizer sees at the first step, and the micro-batches they come from."""
    trainer, _ = train(tmp_path, callback=callback, trainer_cls=BatchRecordingTrainer, max_steps=1, **kwargs)
    catcher = GradientCatcher()
    trainer.add_callback(catcher)
    trainer.train()
    return catcher.grads, trainer.batches


def reference_gradients(batches, subnetworks) -> dict[str, torch.Tensor]:
    """Sum over `subnetworks` of the gradients of the mean LM loss over `batches` (each micro-batch's loss / n)."""
    model = nls_model()
    model.train()
    for subnetwork in subnetworks:
        peft_elastic.set_subnetwork(model, subnetwork)
        for batch in batches:
            (model(**batch).loss / len(batches)).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sandwich_gradients_are_the_sum_over_its_subnetworks(tmp_path, accumulation):
    grads, batches = first_step_gradients(
        tmp_path,
        SubnetworkSamplingCallback("sandwich", seed=0),
        gradient_accumulation_steps=accumulation,
        max_grad_norm=0.0,  # no clipping: compare raw gradients
    )
    assert len(batches) == accumulation
    model = nls_model()
    sampler = SandwichSampler(seed=0)
    sampler.setup(model)
    maximal, middle, minimal = sampler.sample(0, 1)
    assert maximal == peft_elastic.maximal_subnetwork(model) and minimal == peft_elastic.minimal_subnetwork(model)
    expected = reference_gradients(batches, [maximal, middle, minimal])
    assert sorted(grads) == sorted(expected) and len(grads) == 20
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)
    # not the gradient of a single pass
    single = reference_gradients(batches, [maximal])
    assert any((grads[n] - single[n]).abs().max() > 1e-3 for n in single)


@pytest.mark.parametrize("strategy", ["fixed", "sandwich"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, strategy, reentrant):
    options = {"subnetwork": "heuristic"} if strategy == "fixed" else {}
    plain, _ = first_step_gradients(
        tmp_path / "plain", SubnetworkSamplingCallback(strategy, seed=0, **options), max_grad_norm=0.0
    )
    checkpointed, _ = first_step_gradients(
        tmp_path / "gc",
        SubnetworkSamplingCallback(strategy, seed=0, **options),
        max_grad_norm=0.0,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    assert sorted(plain) == sorted(checkpointed) and len(plain) == 20
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    if strategy == "fixed":  # only the heuristic (rank 6) slices have gradients
        a = next(g for n, g in plain.items() if "lora_A" in n)
        assert torch.count_nonzero(a[6:]) == 0 and torch.count_nonzero(a[:6].abs().sum(dim=1)) == 6


# -------------------------------------------------------------------------------------------------- evaluation


def test_evaluation_subnetworks(tmp_path):
    model = nls_model()
    callback = SubnetworkSamplingCallback(
        "random", seed=0, eval_subnetwork="heuristic", eval_subnetworks=("maximal", "heuristic", "minimal")
    )
    trainer, _ = train(
        tmp_path, model=model, callback=callback, trainer_cls=ElasticTrainer, max_steps=2, eval_dataset=EVAL
    )
    trainer.train()
    assert peft_elastic.get_subnetwork(model) == peft_elastic.heuristic_subnetwork(model)
    peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model))
    before = peft_elastic.get_subnetwork(model)
    metrics = trainer.evaluate()
    assert peft_elastic.get_subnetwork(model) == before  # restored

    def loss_of(subnetwork):
        peft_elastic.set_subnetwork(model, subnetwork)
        model.eval()
        with torch.no_grad():
            batch = EVAL.ids
            return model(input_ids=batch, labels=batch).loss.item()

    expected = {name: loss_of(fn(model)) for name, fn in peft_elastic.training.samplers.NAMED_SUBNETWORKS.items()}
    assert len(set(expected.values())) == 3
    assert metrics["eval_loss"] == pytest.approx(expected["heuristic"], rel=1e-5)
    for name, loss in expected.items():
        assert metrics[f"eval_{name}_loss"] == pytest.approx(loss, rel=1e-5), name
    # only the evaluation's own metrics are renamed (the epoch is not an "eval_" metric)
    assert not [key for key in metrics if key.endswith("_")] and "epoch" in metrics


def test_evaluation_during_training_uses_the_eval_subnetwork(tmp_path):
    model = nls_model()
    seen = []
    trainer, _ = train(
        tmp_path,
        model=model,
        callback=SubnetworkSamplingCallback("random", seed=0, eval_subnetwork="minimal"),
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        eval_dataset=TokenDataset(4, seed=1),
    )
    model.register_forward_pre_hook(lambda m, a: None if m.training else seen.append(peft_elastic.get_subnetwork(m)))
    trainer.train()
    assert len(seen) == 2 and all(  # one evaluation batch after each of the 2 steps
        s == peft_elastic.minimal_subnetwork(model) for s in seen
    )


# ------------------------------------------------------------------------------------------------------ errors


def test_unknown_strategy_and_bad_options():
    with pytest.raises(ValueError, match=r"Unknown sampling strategy 'uniform'; valid strategies: \['fixed', "):
        SubnetworkSamplingCallback("uniform")
    with pytest.raises(ValueError, match=r"\['num_random'\] do not apply to strategy 'random'"):
        SubnetworkSamplingCallback("random", num_random=2)
    with pytest.raises(ValueError, match="eval_subnetwork must be one of"):
        SubnetworkSamplingCallback("random", eval_subnetwork="largest")
    with pytest.raises(ValueError, match=r"eval_subnetworks may only name .* unknown: \['best'\]"):
        SubnetworkSamplingCallback("random", eval_subnetworks=["maximal", "best"])
    with pytest.raises(ValueError, match="strategy must be one of"):
        SubnetworkSamplingCallback(3)


def test_sampler_on_a_model_without_elastic_adapters(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=TokenDataset(),
        callbacks=[SubnetworkSamplingCallback("random")],
    )
    with pytest.raises(
        ValueError, match=r"SubnetworkSamplingCallback\(strategy='random'\) needs a model with an elastic"
    ):
        trainer.train()


def test_sandwich_needs_the_trainer_support(tmp_path):
    trainer, _ = train(tmp_path, callback=SubnetworkSamplingCallback("sandwich"))
    with pytest.raises(
        ValueError, match="strategy='sandwich' trains 3 subnetworks per optimizer step.*ElasticSFTTrainer"
    ):
        trainer.train()
    trainer, _ = train(tmp_path, callback=SubnetworkSamplingCallback("random", eval_subnetworks=["minimal"]))
    with pytest.raises(ValueError, match=r"eval_subnetworks=\['minimal'\] needs extra evaluations.*ElasticTrainer"):
        trainer.train()


def test_two_sampling_callbacks_are_refused(tmp_path):
    model = nls_model()
    trainer = ElasticTrainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=TokenDataset(),
        callbacks=[SubnetworkSamplingCallback("random"), SubnetworkSamplingCallback("random", seed=1)],
    )
    with pytest.raises(ValueError, match="2 SubnetworkSamplingCallbacks are registered"):
        trainer.train()
