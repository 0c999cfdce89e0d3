"""The small benchmark scripts at their smallest: each prints one table, side by side, and writes it to the
file it names (scripts/benchmark_lora.py on the demo model's UNet, scripts/benchmark_op_costs.py)."""
import re
from pathlib import Path

from conftest import load_module

REPO = Path(__file__).resolve().parents[1]


def test_weight_mode_writes_its_table(tmp_path, capsys):
    bench = load_module(REPO / "scripts" / "benchmark_lora.py", "benchmark_lora_script")
    out = tmp_path / "lora.md"
    assert bench.main(["--demo", "--frames", "2", "--size", "64", "--out", str(out)]) == 0
    text = out.read_text()
    # (log lines of earlier tests' logging setup may come first)
    assert capsys.readouterr().out.endswith(text + f"written to {out}\n")
    assert re.search(r"^`(OMP_NUM_THREADS=\d+ )?python scripts/benchmark_lora.py --demo --frames 2 --size 64 --out ",
                     text, re.M), text
    assert "80 attention projections" in text  # the demo UNet's attn1/attn2 to_q, to_k, to_v, to_out.0
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s*\|\s*", line.strip("| ")) for line in text.splitlines()
                                                 if line.startswith("| ") and "---" not in line)}
    ms = {name.split(" (")[0]: float(cells[0]) for name, cells in rows.items() if name != "way"}
    assert set(ms) == {"constant weight", "scheduled weight", "one guided UNet step at 64x64"}
    assert rows["one guided UNet step at 64x64 (batch 2)"][2] == "100.00 %"
    assert all(value > 0 for value in ms.values())


def test_op_costs_writes_its_table(tmp_path, capsys):
    bench = load_module(REPO / "scripts" / "benchmark_op_costs.py", "benchmark_op_costs_script")
    out = tmp_path / "ops.md"
    assert bench.main(["--calls", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert capsys.readouterr().out.endswith(text + f"written to {out}\n")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| dilate at radius 2, (1, 4, 64, 64)", "| dilate at radius 2, (2, 1280, 32, 32)",
        "| demo UNet apply_model, batch 1, 16x16 latents", "| demo UNet apply_model, batch 2, 16x16 latents"]
    assert all(float(row.split(" | ")[1]) > 0 for row in rows)
    assert re.fullmatch(r"batch_2_vs_batch_1=[\d.]+", text.splitlines()[-1])
