"""The demo's task: GSM8K-shaped arithmetic word problems, generated offline.

A problem is a short story with two or three steps of addition/subtraction and a question; its answer, as in GSM8K, is
the worked calculation followed by "#### <number>":

    prompt:      "Question: Mia has 23 shells. She finds 9 more. Then she gives away 5. How many shells does Mia have
                  now?\nAnswer:"
    completion:  " 23+9=32. 32-5=27.\n#### 27"

Numbers stay small (a start of 5..30, steps of 1..9) so that a model of a million parameters learns the arithmetic
in a minute of CPU pre-training.

The pre-training corpus (`pretraining_texts`) holds what a base model would know beforehand: bare equations, stories
in the same words without questions, and worked problems of one to three steps. `splits` gives disjoint
train/validation/test sets of problems; the pre-training corpus never contains a validation or test prompt.
"""

from __future__ import annotations

import random
import re

from ..search.evaluators import GSM8K_ANSWER

#: Bump when the generators change: the cached pre-trained base depends on them.
TASK_VERSION = 1

NAMES = [("Tom", "He", "his"), ("Ann", "She", "her"), ("Sam", "He", "his"), ("Mia", "She", "her"),
         ("Ben", "He", "his"), ("Eva", "She", "her"), ("Leo", "He", "his"), ("Zoe", "She", "her")]  # fmt: skip
ITEMS = ["apples", "pens", "books", "coins", "cards", "shells", "eggs", "stamps"]
GAINS = ["buys {n} more", "finds {n} more", "gets {n} more from a friend", "picks up {n} more"]
LOSSES = ["gives away {n}", "loses {n}", "sells {n}", "uses {n}"]
#: Operations per problem of the task, and of the pre-training corpus's worked problems: the base has seen problems
#: of every length the task asks (never its validation or test prompts), so fine-tuning polishes a skill the base
#: has (after the default 2400 pre-training steps it answers 88.6-100 % of the test problems untuned, on either of
#: two CPU code paths; 80 % or 99.8 % after 1200) rather than teaching a new one. With worked problems of one or two
#: steps only, whether the base came out able to chain a third step depended on the float rounding of the CPU's code
#: path (benchmarks/RESULTS.md, "The demo's LoRA across seeds and CPU code paths": LoRA 50 % on one path, 97 % on
#: another); with three-step ones LoRA reaches 99.0-100 % on two code paths over three seeds each (2400-step base).
TASK_STEPS = (2, 3)
PRETRAINING_STEPS = (1, 2, 3)
QUESTIONS = ["How many {item} does {name} have now?", "How many {item} does {name} have left?"]


def _problem(rng: random.Random, steps: int) -> tuple[str, str, str]:
    """(story, question, worked answer) of one problem with `steps` operations."""
    name, pronoun, _ = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    total = rng.randint(5, 30)
    sentences = [f"{name} has {total} {item}."]
    work = []
    for step in range(steps):
        if total > 5 and rng.random() < 0.5:
            n = rng.randint(1, min(total - 1, 9))
            phrase, new = rng.choice(LOSSES).format(n=n), total - n
            work.append(f"{total}-{n}={new}.")
        else:
            n = rng.randint(1, 9)
            phrase, new = rng.choice(GAINS).format(n=n), total + n
            work.append(f"{total}+{n}={new}.")
        sentences.append(f"{pronoun if step == 0 else 'Then ' + pronoun.lower()} {phrase}.")
        total = new
    question = rng.choice(QUESTIONS).format(item=item, name=name)
    return " ".join(sentences), question, " " + " ".join(work) + f"\n#### {total}"


def word_problem(rng: random.Random, steps: int) -> dict[str, str]:
    """One problem `{"prompt": ..., "completion": ...}` of `steps` operations."""
    story, question, answer = _problem(rng, steps)
    return {"prompt": f"Question: {story} {question}\nAnswer:", "completion": answer}


def splits(n_train: int, n_validation: int, n_test: int, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Disjoint train / validation / test problems of two or three steps (no prompt in two splits)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {}
    for split, size in (("test", n_test), ("validation", n_validation), ("train", n_train)):
        rows = []
        while len(rows) < size:
            problem = word_problem(rng, rng.choice(TASK_STEPS))
            if problem["prompt"] not in seen:
                seen.add(problem["prompt"])
                rows.append(problem)
        out[split] = rows
    return {"train": out["train"], "validation": out["validation"], "test": out["test"]}


def pretraining_texts(
    n: int,
    held_out: set[str],
    seed: int = 0,
    worked_fraction: float = 0.1,
    worked_steps: tuple[int, ...] = PRETRAINING_STEPS,
) -> list[str]:
    """`n` documents for pre-training: equation drills, stories without a question, and (`worked_fraction` of them)
    worked problems whose number of steps is drawn from `worked_steps` (default one to three; never a prompt in
    `held_out`)."""
    if not worked_steps or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in worked_steps):
        raise ValueError(f"worked_steps must be a non-empty tuple of step counts >= 1, got {worked_steps!r}.")
    rng = random.Random(seed + 7919)
    texts = []
    while len(texts) < n:
        kind = rng.random()
        if kind < worked_fraction:
            problem = word_problem(rng, rng.choice(worked_steps))
            if problem["prompt"] in held_out:
                continue
            texts.append(problem["prompt"] + problem["completion"])
        elif kind < 0.55 + worked_fraction / 2:
            equations = []
            for _ in range(6):
                a, b = rng.randint(0, 59), rng.randint(0, 9)
                equations.append(f"{a}+{b}={a + b}." if rng.random() < 0.5 or b > a else f"{a}-{b}={a - b}.")
            texts.append(" ".join(equations))
        else:
            texts.append(" ".join(_problem(rng, rng.randint(1, 3))[0] for _ in range(2)))
    return texts


_EQUATION = re.compile(r"(\d+)\s*([+-])\s*(\d+)\s*=\s*(\d+)")
_FINAL = re.compile(GSM8K_ANSWER)  # the evaluators' "#### n", so that "right" reads the answer as the accuracy does


def answer_anatomy(problems: list[dict[str, str]], completions: list[str]) -> dict[str, float]:
    """Where greedy answers to `problems` go wrong, as fractions:
    `formatted` — answers that end the work with "#### n"; `steps` — answers with as many equations as the problem
    has steps; `operands` — of the problems' steps, those whose equation reads the right numbers (the story's start
    or the previous line's result, and the story's amount; a missing equation counts as wrong); `arithmetic` — of the
    equations written, those whose result is right for their own operands; `right` — answers whose "####" number is
    the problem's answer (the accuracy counts a right last number without "####" too)."""
    if len(problems) != len(completions) or not problems:
        raise ValueError(
            f"Need one completion per problem (and some problems): {len(problems)} vs {len(completions)}."
        )
    formatted = steps = right = 0
    operands = expected_steps = arithmetic = written = 0
    for problem, completion in zip(problems, completions, strict=True):
        numbers = [int(n) for n in re.findall(r"\d+", problem["prompt"])]
        equations = [(int(a), op, int(b), int(c)) for a, op, b, c in _EQUATION.findall(completion)]
        final = _FINAL.search(completion)
        formatted += final is not None
        right += final is not None and final.group(1) == _FINAL.search(problem["completion"]).group(1)
        steps += len(equations) == len(numbers) - 1
        previous = numbers[0]
        for index, amount in enumerate(numbers[1:]):
            expected_steps += 1
            if index < len(equations):
                a, _, b, c = equations[index]
                operands += (a, b) == (previous, amount)
                previous = c
        for a, op, b, c in equations:
            written += 1
            arithmetic += c == (a + b if op == "+" else a - b)
    n = len(problems)
    return {
        "formatted": formatted / n,
        "steps": steps / n,
        "operands": operands / expected_steps,
        "arithmetic": arithmetic / written if written else 0.0,
        "right": right / n,
    }
