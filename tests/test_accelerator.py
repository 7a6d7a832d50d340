"""benchmarks/accelerator.py cannot rot: its --smoke mode runs every phase on the CPU."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_accelerator_smoke_writes_every_section(tmp_path):
  out = tmp_path / "accelerator.json"
  subprocess.run([sys.executable, str(REPO / "benchmarks" / "accelerator.py"), "--smoke", f"--out={out}",
                  f"--data_dir={tmp_path / 'tfds'}", f"--workdir={tmp_path / 'runs' / 'lgmnet'}"],
                 check=True, capture_output=True, timeout=600)
  report = json.loads(out.read_text())
  assert report["smoke"] and set(report["phases"]) == {"steps", "torch", "lgmnet"}
  steps, torch_rows, lgm = (report["phases"][k] for k in ("steps", "torch", "lgmnet"))
  assert steps["status"] == "ok" and steps["rows"]
  for r in steps["rows"]:
    assert r["flops"] > 0 and r["ms_per_step"] > 0 and r["images_per_s"] > 0 and r["mfu"] is None  # CPU: no peak
    assert r["flops_per_s"] == r["flops"] / (r["ms_per_step"] / 1000)
  assert torch_rows["status"] == "ok" and torch_rows["rows"]
  for r in torch_rows["rows"]:
    assert r["jax"] > 0 and r["torch"] > 0 and r["torch_compile"] > 0
  assert lgm["status"] == "ok" and lgm["timed_steps"] == 4 and lgm["remaining_steps"] == 2
  assert lgm["projected_rest_s"] > 0 and lgm["full_run"]["status"] == "ok"  # a toy schedule: run in full
  for protocol in ("standard", "reference"):
    assert lgm["test"][protocol]["protocol"] == protocol and lgm["test"][protocol]["step"] == 6
    assert 0 <= lgm["test"][protocol]["accuracy"] <= 100
