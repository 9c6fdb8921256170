"""The README's main job (the demo) and the examples run, and say what they should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from peft_elastic import demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_compares_exports_and_reloads(tmp_path, capsys):
    figures = demo.main(["--steps", "12", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Trained 12 steps" in out and "Reloaded with plain peft.PeftModel" in out
    for label in ("maximal", "heuristic", "minimal"):
        assert figures[label] < figures["base"]  # training helped every subnetwork
    assert figures["stock_reload"] == figures["heuristic"]
    assert figures["stock_max_logit_diff"] < 1e-5
    assert (tmp_path / "heuristic-lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "super-adapter" / "adapter_config.json").is_file()


def test_demo_rejects_bad_steps(capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--steps", "0"])
    assert exit_.value.code == 2
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err


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
