"""scripts/benchmark_lora.py at its smallest (the demo model's UNet): one table, side by side, printed and
written to the file it names."""
import re
from pathlib import Path

from conftest import load_module

REPO = Path(__file__).resolve().parents[1]


def test_weight_mode_writes_its_table(tmp_path, capsys):
    bench = load_module(REPO / "scripts" / "benchmark_lora.py", "benchmark_lora_script")
    out = tmp_path / "lora.md"
    assert bench.main(["--demo", "--frames", "2", "--size", "64", "--out", str(out)]) == 0
    text = out.read_text()
    printed = capsys.readouterr().out
    assert printed == text + f"written to {out}\n"
    assert re.search(r"^`(OMP_NUM_THREADS=\d+ )?python scripts/benchmark_lora.py --demo --frames 2 --size 64 --out ",
                     text, re.M), text
    assert "80 attention projections" in text  # the demo UNet's attn1/attn2 to_q, to_k, to_v, to_out.0
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s*\|\s*", line.strip("| ")) for line in text.splitlines()
                                                 if line.startswith("| ") and "---" not in line)}
    ms = {name.split(" (")[0]: float(cells[0]) for name, cells in rows.items() if name != "way"}
    assert set(ms) == {"constant weight", "scheduled weight", "one guided UNet step at 64x64"}
    assert rows["one guided UNet step at 64x64 (batch 2)"][2] == "100.00 %"
    assert all(value > 0 for value in ms.values())
