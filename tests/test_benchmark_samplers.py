"""scripts/benchmark.py --samplers at its smallest: one table row per sampler with the steps and
UNet evaluations a frame of each costs, the decode line, the ratio line, the file it writes."""
import pytest
import re
from pathlib import Path

from conftest import load_module

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_samplers_mode_writes_its_table(tmp_path, capsys):
    bench = load_module(REPO / "scripts" / "benchmark.py", "benchmark_script_samplers")
    out = tmp_path / "table.md"
    assert bench.main(["--samplers", "--size", "64", "--frames", "1", "--rounds", "2", "--no_whole_command",
                       "--decode_repeats", "1", "--decode_size", "64", "--strength", "0.6", "--out", str(out)]) == 0
    text = out.read_text()
    assert capsys.readouterr().out == text
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and "steps" in line and "---" not in line and "way |" not in line}
    # strength 0.6: PLMS int(25 x 0.6) = 15 steps, one more UNet call in its first, x2 rows of guidance 7.5;
    # LCM all 4 steps at guidance 1 (one row); Euler ancestral int(2 x 0.6) = 1 step at guidance 0
    cells = {name: (int(row[1]), int(row[2])) for name, row in rows.items()}
    assert cells == {"default: PLMS 25 steps, scale 7.5": (15, 32), "LCM 4 steps, scale 1": (4, 4),
                     "Euler ancestral 2 steps, scale 0": (1, 1)}
    assert all(float(row[3]) > 0 and row[5] != "" for row in rows.values())
    assert "Decoding one 64x64 picture" in text and "Load average" in text
    ratio = re.fullmatch(r"lcm_vs_default=([\d.]+) euler_a_vs_default=([\d.]+) whole_command_lcm_vs_default=n/a "
                         r"taesd_decode_speedup=([\d.]+)", text.splitlines()[-1])
    assert ratio and float(ratio.group(3)) > 1  # TAESD decodes faster than the KL autoencoder
