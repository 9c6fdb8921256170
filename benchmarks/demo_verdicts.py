"""Do two demo runs reach the same verdicts? (issue 17: "two runs on different CPU code paths give the same
verdicts".) Reads the `results.json` of finished `peft-elastic demo --output DIR` runs, lines their findings up claim
by claim, and writes the comparison to RESULTS.md.

    peft-elastic demo --output A                                           # this machine's code path
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
        peft-elastic demo --cache-dir C --output B                         # AVX2 at most, with its own base
    ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 \
        peft-elastic demo --cache-dir D --output E                         # a portable one
    python benchmarks/demo_verdicts.py native=A/results.json avx2=B/results.json portable=E/results.json

Every run must have the same settings (the same claims, in the same order); a claim's verdict is "holds", "differs",
"within noise" or "n/a" (peft_elastic/demo/tables.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import sys
from pathlib import Path

from step_time import RESULTS, cpu_model, write_section

MARKERS = ("<!-- demo_verdicts:start -->", "<!-- demo_verdicts:end -->")
_FINDING = re.compile(r"^- \[(?P<verdict>[^\]]+)\] (?P<claim>.*?)(?: \((?P<why>95% interval \[[^\]]*\]|[^()]*)\))?$")


def parse(finding: str) -> tuple[str, str, str]:
    """(verdict, claim, interval or reason) of one findings line "- [holds] ... (95% interval [a, b])"."""
    match = _FINDING.match(finding)
    if match is None:
        raise ValueError(f"Not a findings line of the demo: {finding!r}")
    return match["verdict"], match["claim"], (match["why"] or "").removeprefix("95% interval ")


def load(spec: str) -> tuple[str, dict]:
    """("label", results) from "label=path/results.json"."""
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise SystemExit(f"Give each run as LABEL=path/to/results.json, got {spec!r}.")
    file = Path(path)
    if not file.is_file():
        raise SystemExit(
            f"{label}: no results file at {file} (a finished `peft-elastic demo --output DIR` writes one)."
        )
    return label, json.loads(file.read_text())


def compare(runs: list[tuple[str, dict]]) -> tuple[str, bool]:
    """The Markdown table of the runs' verdicts, claim by claim, and whether every claim has one verdict."""
    settings = {json.dumps(results["settings"], sort_keys=True) for _, results in runs}
    if len(settings) > 1:
        raise SystemExit("The runs have different settings: their claims cannot be compared one by one.")
    parsed = [[parse(line) for line in results["findings"]] for _, results in runs]
    if len({len(p) for p in parsed}) > 1:
        raise SystemExit(f"The runs have different numbers of findings: {[len(p) for p in parsed]}.")
    header = "| claim (as the first run words it) | " + " | ".join(label for label, _ in runs) + " | same |"
    lines = [header, "|---|" + "---|" * len(runs) + "---|"]
    same_everywhere = True
    for row in zip(*parsed, strict=True):
        same = len({verdict for verdict, _, _ in row}) == 1
        same_everywhere &= same
        cells = [f"{verdict} {why}".strip() for verdict, _, why in row]
        lines.append(f"| {row[0][1]} | " + " | ".join(cells) + f" | {'yes' if same else '**no**'} |")
    return "\n".join(lines), same_everywhere


def section(runs: list[tuple[str, dict]], table: str, same: bool, command: str) -> str:
    """The RESULTS.md section of `compare(runs)`'s `table` and `same`."""
    timing = "; ".join(
        f"{label}: {results['seconds']:.0f} s{'' if results.get('base_was_cached') else ' (pre-training included)'}"
        for label, results in runs
    )
    verdict = "every claim has the same verdict on every run" if same else "**some claims differ between the runs**"
    return f"""{MARKERS[0]}
## The demo's verdicts on several CPU code paths (`benchmarks/demo_verdicts.py`)

- Date: {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}; machine: {cpu_model()}
- Command (from the repository root): `{command}`; the runs: {timing}

{table}

Result: {verdict}.
{MARKERS[1]}
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RESULTS_JSON", help="two or more finished demo runs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (default benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two runs to compare")
    runs = [load(spec) for spec in args.runs]
    command = shlex.join(["python", "benchmarks/demo_verdicts.py", *(argv if argv is not None else sys.argv[1:])])
    table, same = compare(runs)
    text = section(runs, table, same, command)
    print(table)
    write_section(args.results, text, MARKERS)
    print(f"\nWrote the section to {args.results}")


if __name__ == "__main__":
    main()
