"""`LMEvalEvaluator` runs lm-evaluation-harness tasks (local YAMLs on JSON files) on the model in memory: its
numbers equal a direct recomputation of the tasks' metrics for every subnetwork, the search takes its direction,
and bad inputs get clear errors."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import randomize_lora_b
from peft import get_peft_model

from peft_elastic import NLSConfig, maximal_subnetwork, minimal_subnetwork, set_subnetwork
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer

pytest.importorskip("lm_eval")
from peft_elastic.search import LMEvalEvaluator, run_search  # noqa: E402

PROBLEMS = arithmetic_problems(12, seed=5)


@pytest.fixture(scope="module")
def tokenizer():
    """Characters only (no merges), so that a continuation's tokens never merge with its context's."""
    tokenizer = train_tokenizer([p["prompt"] + p["completion"] for p in arithmetic_problems(64)], vocab_size=20)
    assert len(tokenizer) == 20  # 4 special tokens + the 16 characters of the problems
    return tokenizer


@pytest.fixture
def model(tokenizer):
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), NLSConfig(r=8, lora_alpha=16, rank_choices=[8, 2]))
    randomize_lora_b(model, std=0.5)
    return model


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two local tasks on one JSON-lines file: the answer's log-likelihood (perplexity, greedy accuracy) and a
    three-way multiple choice."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "arith.jsonl"
    with data.open("w") as f:
        for p in PROBLEMS:
            c = int(p["completion"])
            f.write(
                json.dumps({"question": p["prompt"], "answer": str(c), "choices": [str(c + 1), str(c), str(c + 10)]})
            )
            f.write("\n")
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    common += 'doc_to_text: "{{question}}"\ntarget_delimiter: ""\n'
    (folder / "toy_answer.yaml").write_text(
        "task: toy_answer\n" + common + "output_type: loglikelihood\n" + 'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    (folder / "toy_choice.yaml").write_text(
        "task: toy_choice\n" + common + "output_type: multiple_choice\n" + 'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: 1\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "toy_lower.yaml").write_text(  # a task that declares its accuracy lower-is-better
        "task: toy_lower\n" + common + "output_type: loglikelihood\n" + 'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    higher_is_better: false\n"
    )
    return folder


def loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log-probabilities of `continuation`'s tokens after `context`, and whether each is the argmax."""
    whole = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
    rows = logprobs[start - 1 : len(whole) - 1]
    targets = torch.tensor(whole[start:])
    return float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def oracle(model, tokenizer) -> dict[str, float]:
    answers = [loglikelihood(model, tokenizer, p["prompt"], p["completion"]) for p in PROBLEMS]
    choices = []
    for p in PROBLEMS:
        c = int(p["completion"])
        scores = [loglikelihood(model, tokenizer, p["prompt"], str(x))[0] for x in (c + 1, c, c + 10)]
        choices.append(max(range(3), key=scores.__getitem__) == 1)
    return {
        "perplexity": math.exp(-sum(ll for ll, _ in answers) / len(answers)),
        "greedy": sum(g for _, g in answers) / len(answers),
        "choice": sum(choices) / len(choices),
    }


def test_metrics_equal_a_direct_recomputation_for_each_subnetwork(model, tokenizer, task_dir):
    perplexity = LMEvalEvaluator("toy_answer", tokenizer, metric="perplexity", include_path=task_dir, batch_size=5)
    choice = LMEvalEvaluator(["toy_choice"], tokenizer, include_path=task_dir, batch_size=4)
    mean_acc = LMEvalEvaluator(["toy_choice", "toy_answer"], tokenizer, metric="acc", include_path=task_dir)
    assert (perplexity.direction, choice.direction, mean_acc.direction) == ("minimize", "maximize", "maximize")

    model.train()
    seen = []
    for subnetwork in (maximal_subnetwork(model), minimal_subnetwork(model), maximal_subnetwork(model)):
        set_subnetwork(model, subnetwork)
        expected = oracle(model, tokenizer)
        value = perplexity(model)
        assert value == pytest.approx(expected["perplexity"], rel=1e-5)
        assert choice(model) == pytest.approx(expected["choice"], abs=1e-12)
        assert mean_acc(model) == pytest.approx((expected["choice"] + expected["greedy"]) / 2, abs=1e-12)
        assert model.training  # the mode it was in
        seen.append(value)
    # the subnetworks really differ, and nothing is cached between calls: the maximal one gives its value again
    assert abs(seen[0] - seen[1]) > 1e-3 * seen[0]
    assert seen[2] == pytest.approx(seen[0], rel=1e-9)
    assert perplexity.last_results["results"]["toy_answer"]["perplexity,none"] == seen[2]


def test_run_search_maximizes_the_harness_accuracy(model, tokenizer, task_dir):
    evaluate = LMEvalEvaluator("toy_choice", tokenizer, include_path=task_dir)
    result = run_search(model, evaluate, strategy="random", cost="adapter_params", n_trials=4, seed=0, progress=False)
    assert result.direction == "maximize" and len(result.trials) == 4
    for trial in result.trials:
        set_subnetwork(model, trial["subnetwork"])
        assert trial["metric"] == pytest.approx(oracle(model, tokenizer)["choice"], abs=1e-12)


def test_bad_inputs_get_clear_errors(tokenizer, task_dir, monkeypatch):
    with pytest.raises(ValueError, match="does not know the task.*no_such_task.*include_path"):
        LMEvalEvaluator("no_such_task", tokenizer, include_path=task_dir)
    with pytest.raises(ValueError, match=r"Task 'toy_choice' has no metric 'bleu'; its metrics: \['acc'\]"):
        LMEvalEvaluator("toy_choice", tokenizer, metric="bleu", include_path=task_dir)
    with pytest.raises(ValueError, match="include_path .*nowhere.* does not exist"):
        LMEvalEvaluator("toy_choice", tokenizer, include_path=task_dir / "nowhere")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        LMEvalEvaluator("toy_choice", tokenizer, include_path=task_dir, batch_size=0)
    with pytest.raises(ValueError, match="tasks must be a task name"):
        LMEvalEvaluator([], tokenizer, include_path=task_dir)
    with pytest.raises(ValueError, match="better higher in some tasks and lower in others"):
        LMEvalEvaluator(["toy_answer", "toy_lower"], tokenizer, include_path=task_dir)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'peft-elastic\[eval\]'"):
        LMEvalEvaluator("toy_choice", tokenizer, include_path=task_dir)


def test_an_empty_continuation_gets_a_clear_error(task_dir):
    """With merges, "A:" and a one-digit answer can become one token: lm-eval's bare assert becomes a message."""
    merging = train_tokenizer([p["prompt"] + p["completion"] for p in arithmetic_problems(64)], vocab_size=96)
    model = get_peft_model(tiny_llama(vocab_size=len(merging)), NLSConfig(r=8, rank_choices=[8, 4]))
    assert any(
        len(merging.encode(p["prompt"] + p["completion"])) <= len(merging.encode(p["prompt"])) for p in PROBLEMS
    ), "no answer merges with its prompt under this tokenizer: the test would not test anything"
    evaluator = LMEvalEvaluator("toy_answer", merging, metric="perplexity", include_path=task_dir)
    with pytest.raises(ValueError, match=r"rejected a request.*target_delimiter.*\(huggingface.py:\d+\)"):
        evaluator(model)
