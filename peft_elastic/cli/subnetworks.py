"""`--subnetwork`: choosing the subnetwork of an elastic adapter (a named one or a JSON file), and summarising it
on stdout (one line, and a table per kind of group)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .inputs import CommandError, hub_id

SUBNETWORKS = ("active", "heuristic", "maximal", "minimal")


def choose_subnetwork(model, choice: str) -> dict[str, int] | None:
    """Activate the subnetwork `choice` names on `model` and return it: one of `SUBNETWORKS` or a JSON file holding
    `{group: choice}` (or a search result's entry, `{"subnetwork": {...}, ...}`). None for a model without an
    elastic adapter (with "active")."""
    from ..subnetwork import (
        get_subnetwork,
        heuristic_subnetwork,
        maximal_subnetwork,
        minimal_subnetwork,
        search_space,
        set_subnetwork,
    )

    elastic = True
    try:
        search_space(model)
    except ValueError:
        elastic = False
    if not elastic:
        if choice != "active":
            raise CommandError(f"--subnetwork {choice}: the adapter is not elastic (it has one size); leave it out")
        return None
    if choice in SUBNETWORKS:
        pick = {
            "active": get_subnetwork,
            "heuristic": heuristic_subnetwork,
            "maximal": maximal_subnetwork,
            "minimal": minimal_subnetwork,
        }[choice]
        chosen = pick(model)
        set_subnetwork(model, chosen)
        return chosen
    set_subnetwork(model, read_subnetwork_file(choice))  # validates it: unknown groups or choices
    return get_subnetwork(model)


def read_subnetwork_file(choice: str) -> dict:
    """The `{group: choice}` of the --subnetwork JSON file `choice` (or of the search result's entry it holds,
    `{"subnetwork": {...}, ...}`); its groups are checked when it is set on the model."""
    path = Path(choice).expanduser()
    if not path.is_file():
        looks_like_a_file = path.suffix.lower() == ".json" or not hub_id(choice)
        missing = "no such file; " if looks_like_a_file else ""
        raise CommandError(
            f"--subnetwork {choice!r}: {missing}use one of {list(SUBNETWORKS)} or a JSON file {{group name: choice}}"
        )
    try:
        chosen = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CommandError(f"--subnetwork {choice!r} is not valid JSON ({error})") from None
    if isinstance(chosen, dict) and isinstance(chosen.get("subnetwork"), dict):
        chosen = chosen["subnetwork"]
    if not isinstance(chosen, dict):
        raise CommandError(f"--subnetwork {choice!r} must hold a JSON object {{group name: choice}}")
    return chosen


#: The file `export` writes the full subnetwork to, in its output folder.
SUBNETWORK_FILE = "subnetwork.json"


#: How each kind of group is named in a summary, by the suffix of its name (rank groups have none).
KINDS = {"": ("ranks", "groups"), "width": ("MLP widths", "blocks"), "heads": ("heads", "blocks")}


def _counted(values: list[int]) -> str:
    """`8/6 in 60/30`: each value, largest first, and how many of `values` have it."""
    counts = {value: values.count(value) for value in sorted(set(values), reverse=True)}
    return f"{'/'.join(map(str, counts))} in {'/'.join(map(str, counts.values()))}"


def _kind(group: str) -> str:
    """The suffix of a group name: "" (a rank group), "width", "heads" or "block"."""
    return group.rpartition(":")[2] if ":" in group else ""


def subnetwork_summary(subnetwork: dict[str, int]) -> str:
    """One line for `subnetwork`, e.g. "ranks 8/6 in 60/30 groups, MLP widths 1152 in 30 blocks, heads 6 in 30
    blocks, 2 of 4 droppable blocks dropped"."""
    parts = []
    for kind, (what, unit) in KINDS.items():
        values = [value for group, value in subnetwork.items() if _kind(group) == kind]
        if values:
            parts.append(f"{what} {_counted(values)} {unit if len(values) > 1 else unit[:-1]}")
    blocks = [value for group, value in subnetwork.items() if _kind(group) == "block"]
    if blocks:
        parts.append(f"{blocks.count(0)} of {len(blocks)} droppable blocks dropped")
    return ", ".join(parts)


def subnetwork_table(subnetwork: dict[str, int], space: dict[str, list[int]]) -> list[str]:
    """A compact table of `subnetwork`, one row per kind of group across the layers (the layer index shown as `*`):
    how many groups, their choices (`space`, the search space) and how many chose each."""
    rows: dict[str, list[str]] = {}
    for group in subnetwork:
        rows.setdefault(re.sub(r"\.\d+(?=[.:]|$)", ".*", group), []).append(group)
    table = [("groups", "n", "choices", "chosen")]
    for pattern, groups in rows.items():
        values = [subnetwork[group] for group in groups]
        if _kind(pattern) == "block":
            choices, chosen = "keep/drop", f"kept {values.count(1)}, dropped {values.count(0)}"
        else:
            offered = sorted({choice for group in groups for choice in space[group]}, reverse=True)
            choices, chosen = "/".join(map(str, offered)), _counted(values)
        table.append((pattern, str(len(groups)), choices, chosen))
    widths = [max(len(row[column]) for row in table) for column in range(3)]
    return [
        f"  {name:<{widths[0]}}  {count:>{widths[1]}}  {choices:<{widths[2]}}  {chosen}"
        for name, count, choices, chosen in table
    ]


def subnetwork_label(choice: str) -> str:
    return f"{choice} subnetwork" if choice in SUBNETWORKS else f"subnetwork {choice}"
