"""The quickstart and Shears examples run, and say what they should (the demo: test_demo.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    # 2 layers x (q/k/v, up, down); per layer q 64+64, k 64+32, v 64+32, up 64+128, down 128+64 = 704 per rank
    assert lines[0] == f"6 groups; heuristic subnetwork uses {24 * 2 * 704:,} adapter parameters"
    assert float(lines[1].split(":")[1]) == 0.0
    assert float(lines[2].split(":")[1]) < 1e-5
    assert (tmp_path / "sub" / "adapter_config.json").is_file()


@pytest.mark.parametrize("strategy", ["random", "sandwich"])
def test_shears_sft_example(tmp_path, strategy):
    command = [sys.executable, str(ROOT / "examples" / "shears_sft.py"), "--output-dir", str(tmp_path)]
    result = subprocess.run(
        [*command, "--steps", "8", "--strategy", strategy], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert sorted(figures) == ["base", "heuristic", "maximal", "minimal"]
    for name in ("maximal", "heuristic", "minimal"):
        assert figures[name] < figures["base"] - 0.1, (name, figures)  # 8 steps already help every subnetwork
    # hidden 96, intermediate 192, 2 layers: per rank q 96+96, k 96+48, v 96+48, up 96+192, down 192+96 = 1056
    table = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.split()}
    assert [table[name][-1] for name in ("maximal", "heuristic", "minimal")] == ["16,896", "12,672", "8,448"]
    super_config = json.loads((tmp_path / "super-adapter" / "adapter_config.json").read_text())
    assert super_config["peft_type"] == "NLS" and super_config["rank_choices"] == [8, 6, 4]
    stock_config = json.loads((tmp_path / "heuristic-lora" / "adapter_config.json").read_text())
    assert stock_config["peft_type"] == "LORA" and set(stock_config["rank_pattern"].values()) == {6}


def test_shears_sft_example_rejects_bad_arguments():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "shears_sft.py"), "--strategy", "uniform"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and "invalid choice: 'uniform'" in result.stderr
