"""`LMEvalEvaluator`: lm-evaluation-harness tasks as a search metric, run on the model in memory (its `HFLM` wrapping
the PeftModel with the trial's subnetwork active) — never reloading it, never through the harness's request cache.
Needs the `eval` extra (`pip install "peft-elastic[eval]"`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from ..checks import check_int

DIRECTIONS = {True: "maximize", False: "minimize"}


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            "LMEvalEvaluator needs lm-evaluation-harness (lm-eval >= 0.4.5): pip install 'peft-elastic[eval]'."
        ) from error
    return evaluate, HFLM, TaskManager


class LMEvalEvaluator:
    """The `metric` of lm-evaluation-harness `tasks` (names, YAML paths or task-config dicts; a task's own metric
    list applies) for the model as it is: each call wraps the model object in the harness's `HFLM` and runs the
    tasks loaded once at construction, without the request cache and without bootstrapped standard errors. With
    several tasks the result is their unweighted mean (the papers' "average accuracy").

    `metric` is a metric name ("acc", "acc_norm", "exact_match", "perplexity", ...), optionally with its filter
    ("exact_match,strict-match"); the direction (maximize / minimize) is the tasks' `higher_is_better` for it.
    `include_path`: a folder (or list) of task YAMLs, e.g. local tasks on JSON files for an offline machine; when
    every named task is found there the harness's ~15,000 built-in task configs are not indexed. `limit` caps the
    documents per task, `num_fewshot` overrides the tasks' few-shot count (sampled with `fewshot_seed`, the same
    prompts for every subnetwork). The model is evaluated in eval mode and put back in the mode it was in.
    `last_results` holds the harness's full results of the last call."""

    def __init__(
        self,
        tasks: str | Mapping | Sequence[str | Mapping],
        tokenizer,
        *,
        metric: str = "acc",
        include_path: str | Path | Sequence[str | Path] | None = None,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        fewshot_seed: int = 1234,
        batch_size: int = 8,
        max_length: int | None = None,
    ) -> None:
        self._evaluate, self._hflm, task_manager_class = _import_lm_eval()
        tasks = [tasks] if isinstance(tasks, (str, Mapping)) else list(tasks)
        if not tasks or not all(isinstance(t, (str, Mapping)) for t in tasks):
            raise ValueError(
                f"tasks must be a task name, a task-config dict, or a non-empty list of them, got {tasks!r}."
            )
        check_int("batch_size", batch_size)
        check_int("num_fewshot", num_fewshot, 0, optional=True, valid="None or an int >= 0")
        if not isinstance(metric, str) or not metric:
            raise ValueError(
                f"metric must be a metric name such as 'acc' or 'exact_match,strict-match', got {metric!r}."
            )
        manager = _task_manager(task_manager_class, tasks, include_path)
        try:
            self._loaded = manager.load(tasks)
        except KeyError as error:
            raise ValueError(
                f"lm-eval does not know the task(s) {tasks!r} ({error.args[0] if error.args else error}); pass a "
                "built-in task name, a YAML path, a task-config dict, or include_path= with the folder of your YAMLs."
            ) from None
        self._tasks = self._loaded["tasks"]
        self.task_names = [t if isinstance(t, str) else t.get("task") for t in tasks]
        self.metric, self.limit, self.batch_size, self.max_length = metric, limit, batch_size, max_length
        self.tokenizer, self.fewshot_seed = tokenizer, fewshot_seed
        self._lm = None  # the HFLM of the last model evaluated (it wraps the model object, not a copy)
        for task in self._tasks.values():
            if num_fewshot is not None:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        self.direction = self._direction()
        self.last_results: dict | None = None

    def _direction(self) -> str:
        name = self.metric.split(",")[0]
        higher = {}
        for task_name, task in self._tasks.items():
            flags = task.higher_is_better() or {}
            if name not in flags:
                raise ValueError(
                    f"Task {task_name!r} has no metric {name!r}; its metrics: {sorted(flags)}. "
                    "Pass metric= one of them."
                )
            higher[task_name] = bool(flags[name])
        if len(set(higher.values())) != 1:
            raise ValueError(f"Metric {name!r} is better higher in some tasks and lower in others: {higher}.")
        return DIRECTIONS[next(iter(higher.values()))]

    def __call__(self, model: nn.Module) -> float:
        was_training = model.training
        for task in self._tasks.values():
            task.set_fewshot_seed(seed=self.fewshot_seed)
        try:
            if self._lm is None or self._lm.model is not model:
                self._lm = self._hflm(
                    pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size, max_length=self.max_length
                )
            model.eval()
            results = self._evaluate(
                lm=self._lm,
                task_dict=self._loaded,
                limit=self.limit,
                cache_requests=False,
                bootstrap_iters=0,
                log_samples=False,
            )
        except AssertionError as error:  # lm-eval checks its requests with bare asserts
            raise ValueError(
                "lm-evaluation-harness rejected a request (a failed internal check). With a loglikelihood or "
                "multiple-choice task this is usually an answer whose tokens merge with the end of its prompt, which "
                "leaves an empty continuation: give the task a target_delimiter that separates them (the default "
                f"' ') or a tokenizer that keeps them apart. ({_where(error)})"
            ) from error
        finally:
            model.train(was_training)
        self.last_results = results
        return self._value(results["results"])

    def _value(self, results: Mapping[str, Mapping]) -> float:
        values = []
        for name in self.task_names:
            entry = results.get(name) if name is not None else None
            if entry is None:  # a task-config dict without a name, or a group reported under its subtasks
                raise ValueError(f"lm-eval reported no results for task {name!r}; reported: {sorted(results)}.")
            values.append(_metric_value(entry, self.metric, name))
        return sum(values) / len(values)


def _where(error: BaseException) -> str:
    """`file:line` of the frame that raised `error`."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return f"{Path(frame.tb_frame.f_code.co_filename).name}:{frame.tb_lineno}" if frame is not None else "unknown"


def _metric_value(entry: Mapping, metric: str, task: str) -> float:
    """`metric` ("acc" or "acc,none") in one task's results entry."""
    if "," in metric:
        keys = [metric] if metric in entry else []
    else:
        keys = [k for k in entry if k.split(",")[0] == metric and not k.endswith("_stderr")]
    available = sorted(k for k in entry if "," in k and "_stderr," not in k)
    if len(keys) != 1:
        detail = "several filters" if keys else "no such metric"
        raise ValueError(
            f"Task {task!r}: {detail} for {metric!r}; its metrics: {available}. Name one of them exactly."
        )
    value = entry[keys[0]]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"Task {task!r}: metric {keys[0]!r} is {value!r}, not a number.")
    return float(value) if math.isfinite(value) else math.nan


def _task_manager(task_manager_class, tasks: list, include_path):
    """A TaskManager that knows `tasks`: only `include_path`'s YAMLs when they define every named task (indexing the
    built-in ones takes seconds), else the built-in tasks too."""
    names = [t for t in tasks if isinstance(t, str)]
    if include_path is not None:
        paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path)]
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise ValueError(f"include_path {missing} does not exist; give the folder(s) holding your task YAMLs.")
        local = task_manager_class(include_path=paths, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
        return task_manager_class(include_path=paths)
    if not names:
        return task_manager_class(include_defaults=False)
    return task_manager_class()
