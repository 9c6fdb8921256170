"""Subnetwork search: strategies on a synthetic problem with a known Pareto front, the result object, resume,
evaluators and errors."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import pytest
import torch
from peft import get_peft_model

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.search import LossEvaluator, SearchResult, run_search
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def super_network():
    return get_peft_model(tiny_llama(), ElasticLoraConfig(r=8, rank_choices=[8, 6, 4], target_modules=TARGETS))


class Synthetic:
    """A metric (lower is better) that falls with every group's rank, with weights that differ by group, read from
    the model's active subnetwork; with the adapter-parameter cost, its Pareto front is known by enumeration."""

    direction = "minimize"

    def __init__(self, model):
        self.weights = {name: 1.0 + i for i, name in enumerate(peft_elastic.search_space(model))}
        self.calls = 0

    def value(self, subnetwork) -> float:
        return sum(w * 8 / subnetwork[name] for name, w in self.weights.items())

    def __call__(self, model) -> float:
        self.calls += 1
        return self.value(peft_elastic.get_subnetwork(model))


def adapter_params(model, subnetwork) -> float:
    return float(peft_elastic.num_adapter_parameters(model, subnetwork))


def true_front(model, evaluator) -> set[tuple[float, float]]:
    space = peft_elastic.search_space(model)
    points = []
    for values in itertools.product(*space.values()):
        subnetwork = dict(zip(space, values, strict=True))
        points.append((evaluator.value(subnetwork), adapter_params(model, subnetwork)))
    return {p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)}


@pytest.fixture(scope="module")
def model():
    return super_network()


@pytest.mark.parametrize("strategy", ["random", "nsga2", "tpe", "hill_climb"])
def test_every_strategy_finds_points_of_the_true_front(model, strategy):
    evaluator = Synthetic(model)
    front = true_front(model, evaluator)
    active = peft_elastic.get_subnetwork(model)
    result = run_search(model, evaluator, strategy=strategy, cost=adapter_params, n_trials=30, seed=0, progress=False)
    assert peft_elastic.get_subnetwork(model) == active  # restored
    assert len(result.trials) == 30 and all(t["state"] == "complete" for t in result.trials)
    found = {(t["metric"], t["cost"]) for t in result.pareto_front()}
    assert found & front  # it found Pareto-optimal points (the seeded maximal and minimal are two of them)
    assert len(found & front) >= 3
    # the maximal, heuristic and minimal subnetworks were evaluated first
    assert [t["subnetwork"] for t in result.trials[:3]] == [
        peft_elastic.maximal_subnetwork(model),
        peft_elastic.heuristic_subnetwork(model),
        peft_elastic.minimal_subnetwork(model),
    ]
    assert result.reference["subnetwork"] == peft_elastic.maximal_subnetwork(model)
    assert evaluator.calls == len(
        {json.dumps(t["subnetwork"], sort_keys=True) for t in result.trials}
    )  # no re-evaluation


def test_nsga2_and_tpe_beat_random_on_hypervolume(model):
    evaluator = Synthetic(model)
    reference_point = (
        evaluator.value(peft_elastic.minimal_subnetwork(model)) * 1.01,
        adapter_params(model, peft_elastic.maximal_subnetwork(model)) * 1.01,
    )
    volumes = {}
    for strategy in ("random", "nsga2", "tpe"):
        volumes[strategy] = [
            run_search(model, evaluator, strategy, adapter_params, n_trials=40, seed=seed, progress=False).hypervolume(
                reference_point
            )
            for seed in range(3)
        ]
    mean = {strategy: sum(v) / len(v) for strategy, v in volumes.items()}
    assert mean["nsga2"] > mean["random"] and mean["tpe"] > mean["random"], volumes


def test_heuristic_strategy_and_the_selection_rule(model):
    evaluator = Synthetic(model)
    result = run_search(model, evaluator, "heuristic", adapter_params, n_trials=50, progress=False)
    assert [t["subnetwork"] for t in result.trials] == [
        peft_elastic.maximal_subnetwork(model),
        peft_elastic.heuristic_subnetwork(model),
    ]
    maximal, heuristic = (t["metric"] for t in result.trials)
    drop = heuristic / maximal - 1
    assert result.best(max_metric_drop=drop + 1e-9)["subnetwork"] == peft_elastic.heuristic_subnetwork(model)
    assert result.best(max_metric_drop=drop / 2)["subnetwork"] == peft_elastic.maximal_subnetwork(model)
    with pytest.raises(ValueError, match="No trial is within"):
        result.best(0.0, reference_metric=maximal / 2)
    with pytest.raises(ValueError, match=r"max_metric_drop is a relative drop in \[0, 1\)"):
        result.best(1.5)


def test_result_json_round_trip_and_plots(model, tmp_path):
    result = run_search(model, Synthetic(model), "random", adapter_params, n_trials=8, seed=1, progress=False)
    path = result.save(tmp_path / "result.json")
    again = SearchResult.load(path)
    assert again == result and again.pareto_front() == result.pareto_front()
    for plot in ("plot_pareto", "plot_progression"):
        png = getattr(result, plot)(tmp_path / f"{plot}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert result.timing["evaluations"] == 8 and result.timing["switch_seconds"] >= 0


def test_resume_continues_without_repeating(model, tmp_path):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    evaluator = Synthetic(model)
    first = run_search(model, evaluator, "nsga2", adapter_params, n_trials=6, seed=0, storage=storage, progress=False)
    calls = evaluator.calls
    second = run_search(
        model, evaluator, "nsga2", adapter_params, n_trials=12, seed=0, storage=storage, progress=False
    )
    assert len(second.trials) == 12 and second.trials[:6] == first.trials
    assert evaluator.calls - calls <= 6  # only the new trials were evaluated
    other = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8, rank_choices=[8, 4], target_modules=TARGETS))
    with pytest.raises(ValueError, match="belongs to a different search"):
        run_search(other, Synthetic(other), "nsga2", adapter_params, n_trials=3, storage=storage, progress=False)


def test_failed_evaluations_are_recorded_and_the_search_goes_on(model):
    evaluator = Synthetic(model)

    def sometimes_nan(m):
        value = evaluator(m)
        return math.nan if value > evaluator.value(peft_elastic.heuristic_subnetwork(m)) else value

    result = run_search(model, sometimes_nan, "random", adapter_params, n_trials=12, seed=2, progress=False)
    states = [t["state"] for t in result.trials]
    assert len(states) == 12 and "failed" in states and "complete" in states
    assert all(t["metric"] is None for t in result.trials if t["state"] == "failed")


def test_search_errors(model):
    evaluator = Synthetic(model)
    cases = [
        (dict(strategy="anneal"), r"Unknown search strategy 'anneal'; valid strategies: \['heuristic', 'random'"),
        (dict(cost="flops"), r"Unknown cost 'flops'; use one of \['params', 'macs', 'latency', 'adapter_params'\]"),
        (dict(n_trials=0), r"n_trials must be an int >= 1, got 0"),
        (dict(direction="up"), r"direction must be one of \['minimize', 'maximize'\], got 'up'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            run_search(model, evaluator, **({"progress": False} | kwargs))
    with pytest.raises(ValueError, match="evaluate must be a callable"):
        run_search(model, 3.0, progress=False)
    with pytest.raises(ValueError, match=r"The data is None; give texts \(with tokenizer=\), input_ids tensors"):
        LossEvaluator(None)  # not the message of Wanda's calibration, which the same reader serves


def test_loss_evaluator_and_the_cost_of_params():
    texts = [p["prompt"] + p["completion"] for p in arithmetic_problems(12, seed=3)]
    tok = train_tokenizer([p["prompt"] + p["completion"] for p in arithmetic_problems(400, seed=4)], vocab_size=96)
    assert min(len(tok(t)["input_ids"]) for t in texts) >= 3
    model = get_peft_model(tiny_llama(vocab_size=len(tok)), ElasticLoraConfig(r=8, target_modules=TARGETS))
    evaluator = LossEvaluator(texts, tok, batch_size=5)  # padded batches, the pads masked out
    loss = evaluator(model)
    with torch.no_grad():
        losses = [
            model(**tok(t, return_tensors="pt"), labels=tok(t, return_tensors="pt")["input_ids"]).loss for t in texts
        ]
    counts = [len(tok(t)["input_ids"]) - 1 for t in texts]
    expected = sum(float(value) * n for value, n in zip(losses, counts, strict=True)) / sum(counts)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert LossEvaluator(texts, tok, perplexity=True)(model) == pytest.approx(math.exp(loss), rel=1e-5)
    with pytest.warns(UserWarning, match=r"cost='params' is the same for every subnetwork.*'adapter_params'"):
        result = run_search(model, evaluator, "heuristic", "params", progress=False)
    base = model.get_base_model()
    lora = sum(p.numel() for n, p in base.named_parameters() if "lora_" in n)
    assert result.trials[0]["cost"] == sum(p.numel() for p in base.parameters()) - lora  # the deployed model
    assert result.trials[0]["metric"] == pytest.approx(loss)


def test_resume_after_a_real_process_kill(model, tmp_path):
    """A search process killed in the middle of its 5th trial: started again with the same storage, it keeps the 4
    finished trials, evaluates the interrupted subnetwork again, and goes on to n_trials without repeating any."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import optuna

    storage = f"sqlite:///{tmp_path / 'search.db'}"
    worker = Path(__file__).with_name("search_worker.py")
    process = subprocess.Popen(
        [sys.executable, str(worker), storage, "10", "5"],
        cwd=worker.parent,
        env=os.environ | {"PYTHONPATH": str(worker.parent)},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="peft_elastic-nsga2", storage=storage).get_trials(deepcopy=False)
            except KeyError:  # the study is not created yet
                continue
            states = [t.state for t in trials]
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            # the 5th trial has its whole subnetwork (a trial is RUNNING from `ask`, before its parameters are drawn)
            groups = max((len(t.params) for t in trials), default=0)
            if states.count(optuna.trial.TrialState.COMPLETE) == 4 and running and len(running[0].params) == groups:
                break
            assert process.poll() is None, "the worker stopped before it could be killed"
        else:
            pytest.fail("the worker did not reach its 5th trial in time")
        interrupted = next(t.params for t in trials if t.state == optuna.trial.TrialState.RUNNING)
        finished = [(t.params, t.values) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL

    evaluator = Synthetic(model)
    result = run_search(
        model, evaluator, "nsga2", adapter_params, n_trials=10, seed=0, storage=storage, progress=False
    )
    assert len(result.trials) == 10 and all(t["state"] == "complete" for t in result.trials)
    assert [(t["subnetwork"], [t["metric"], t["cost"]]) for t in result.trials[:4]] == finished  # kept, in order
    assert interrupted in [t["subnetwork"] for t in result.trials[4:]]  # evaluated again, not lost
    assert evaluator.calls <= 6  # only the trials not finished before the kill were evaluated


def test_extract_answer():
    from peft_elastic.search import extract_answer

    assert extract_answer("She has 3 apples.\n#### 1,234") == "1234"
    assert extract_answer("so the answer is -7.5 dollars") == "-7.5"
    assert extract_answer("#### 42 and then 7") == "42"
    assert extract_answer("no number here") is None
    assert extract_answer("x 12", pattern=None) == "12"


class Arithmetic(torch.nn.Module):
    """A stand-in model for the generation path: it reads each (left-padded) prompt "Q:a+b=?A:" and writes a+b —
    wrongly (plus one) when a is odd — followed by end-of-sequence."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen_batches = []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert not do_sample and bool((attention_mask[:, -1] == 1).all())  # left padding
        self.seen_batches.append(input_ids.shape[0])
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).replace(" ", "")
            a, b = (int(x) for x in prompt[2:].split("=")[0].split("+"))
            answer = self.tokenizer(f"{a + b + (a % 2)}", add_special_tokens=False)["input_ids"]
            rows.append(torch.cat([ids, torch.tensor(answer + [self.tokenizer.eos_token_id])]))
        length = max(len(r) for r in rows)
        return torch.stack([torch.nn.functional.pad(r, (0, length - len(r)), value=pad_token_id) for r in rows])


def test_exact_match_evaluator_scores_generated_answers():
    from peft_elastic.search import ExactMatchEvaluator

    problems = arithmetic_problems(20, seed=5)
    tok = train_tokenizer([p["prompt"] + p["completion"] for p in arithmetic_problems(400, seed=4)], vocab_size=96)
    examples = [{"prompt": p["prompt"], "answer": "#### " + p["completion"]} for p in problems]
    evaluator = ExactMatchEvaluator(examples, tok, batch_size=6)
    model = Arithmetic(tok)
    side = tok.padding_side
    even = sum(int(p["prompt"][2:].split("+")[0]) % 2 == 0 for p in problems)
    assert 0 < even < 20
    assert evaluator(model) == pytest.approx(even / 20)
    assert model.seen_batches == [6, 6, 6, 2] and tok.padding_side == side  # padding side restored
    a, b = (int(x) for x in problems[0]["prompt"][2:].split("=")[0].split("+"))
    assert evaluator.last_completions[0].replace(" ", "") == str(a + b + a % 2)
    with pytest.raises(ValueError, match=r"Example 0 has no \['answer'\]"):
        ExactMatchEvaluator([{"prompt": "x"}], tok)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
        ExactMatchEvaluator(examples, tok, max_new_tokens=0)


def test_latency_and_macs_costs(model, monkeypatch):
    from peft_elastic.search.latency import RelativeLatency

    evaluator = Synthetic(model)
    calls = []

    def fake_time(self, m, subnetwork):  # a forward "takes" as long as the adapter parameters it uses
        peft_elastic.set_subnetwork(m, subnetwork)
        calls.append((peft_elastic.get_subnetwork(m), tuple(self.input_ids.shape)))
        return float(peft_elastic.num_adapter_parameters(m))

    monkeypatch.setattr(RelativeLatency, "_time", fake_time)
    result = run_search(model, evaluator, "random", "latency", n_trials=5, seed=3, seq_len=16, progress=False)
    maximal = adapter_params(model, peft_elastic.maximal_subnetwork(model))
    measured = [c[0] for c in calls if c[0] != peft_elastic.maximal_subnetwork(model)]
    assert {json.dumps(s, sort_keys=True) for s in measured} <= {
        json.dumps(t["subnetwork"], sort_keys=True) for t in result.trials
    }
    assert {c[1] for c in calls} == {(1, 16)}
    assert [t["cost"] for t in result.trials] == [
        pytest.approx(adapter_params(model, t["subnetwork"]) / maximal) for t in result.trials
    ]
    assert all(t["cost_spread"] == [pytest.approx(t["cost"])] * 2 for t in result.trials)
    result = run_search(model, evaluator, "heuristic", "adapter_params", progress=False)
    assert [t["cost"] for t in result.trials] == [adapter_params(model, t["subnetwork"]) for t in result.trials]
    with pytest.warns(UserWarning, match="cost='macs' is the same for every subnetwork"):
        result = run_search(model, evaluator, "heuristic", "macs", seq_len=16, progress=False)
    assert result.trials[0]["cost"] == peft_elastic.count_macs(
        model, peft_elastic.maximal_subnetwork(model), seq_len=16
    )
    widths = ElasticLoraConfig(r=8, target_modules=TARGETS + ["gate_proj"], width_choices=[1.0, 0.5])
    mode_b = get_peft_model(tiny_llama(), widths)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # widths change the deployed model: no warning
        trials = run_search(mode_b, Synthetic(mode_b), "random", "macs", n_trials=3, progress=False).trials
    assert trials[0]["cost"] > trials[2]["cost"]  # the maximal and the minimal subnetwork


def test_the_issue_flow_verbatim(tmp_path, monkeypatch):
    """The user flow of the issue, as written: a Mode B super-network, a validation `datasets.Dataset`, NSGA-II over
    loss and deployed parameters for 100 trials in an SQLite storage; then the front, the selection and the plot."""
    from datasets import Dataset

    problems = arithmetic_problems(400, seed=4)
    tokenizer = train_tokenizer([p["prompt"] + p["completion"] for p in problems], vocab_size=96)
    val_dataset = Dataset.from_list([{"text": p["prompt"] + p["completion"]} for p in problems[:16]])
    config = ElasticLoraConfig(r=8, target_modules=TARGETS + ["gate_proj"], width_choices=[1.0, 0.75, 0.5])
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), config)
    monkeypatch.chdir(tmp_path)

    result = run_search(model, evaluate=LossEvaluator(val_dataset, tokenizer), strategy="nsga2",
                        cost="params", n_trials=100, seed=0, storage="sqlite:///search.db")  # fmt: skip
    front = result.pareto_front()
    best = result.best(max_metric_drop=0.01)
    png = result.plot_progression("search.png")

    assert len(result.trials) == 100 and (tmp_path / "search.db").stat().st_size > 0
    assert [set(point) >= {"subnetwork", "metric", "cost"} for point in front] == [True] * len(front)
    costs, losses = [p["cost"] for p in front], [p["metric"] for p in front]
    assert costs == sorted(costs) and losses == sorted(losses, reverse=True) and len(front) >= 2
    complete = [t for t in result.trials if t["state"] == "complete"]
    assert not any(t["metric"] <= p["metric"] and t["cost"] < p["cost"] for t in complete for p in front)
    reference = result.reference["metric"]  # the maximal subnetwork's loss
    within = [t for t in complete if t["metric"] <= reference * 1.01]
    assert best["cost"] == min(t["cost"] for t in within) and best["metric"] <= reference * 1.01
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.name == "search.png"
    peft_elastic.set_subnetwork(model, best["subnetwork"])
    assert peft_elastic.count_parameters(model) == best["cost"]
    # the same call again finds its 100 trials done: nothing is evaluated
    again = run_search(model, evaluate=lambda m: pytest.fail("evaluated again"), strategy="nsga2", cost="params",
                       n_trials=100, seed=0, storage="sqlite:///search.db", direction="minimize")  # fmt: skip
    assert again.trials == result.trials
