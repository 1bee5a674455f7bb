"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, on the CPU (kernels/aot_check.py).

The check runs in a subprocess with TRITON_INTERPRET removed (conftest sets it for this process):
Triton compiles each launch the launchers pick at a Llama-3-8B shape down to a cubin with its
bundled ptxas. Wanted: every variant compiles, fits in shared memory, spills nothing, and each
``tl.dot`` lowers to the tensor-core instruction its dtype calls for.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton missing")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "kernels" / "aot_check.py"
# variants per dtype: lse (1 or 2 heads) x bias, KL forward (with/without targets) x bias, backward (lp, kl, both) x bias
VARIANTS_PER_DTYPE = 4 + 4 + 6
# What each dot must lower to: tensor cores for 16-bit heads and for fp32 with TF32 requested,
# CUDA-core FMA for fp32 heads otherwise (IEEE fp32 has no tensor-core instruction).
MMA = {
    ("bf16", 80): r"^mma m16n8k16 bf16$", ("bf16", 90): r"^wgmma m64n\d+k16 bf16$",
    ("fp16", 80): r"^mma m16n8k16 f16$", ("fp16", 90): r"^wgmma m64n\d+k16 f16$",
    ("tf32", 80): r"^mma m16n8k8 tf32$", ("tf32", 90): r"^wgmma m64n\d+k8 tf32$",
    ("fp32", 80): r"^FMA$", ("fp32", 90): r"^FMA$",
}


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    results = json.loads(out.read_text()) if out.exists() else None
    return proc, results


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    proc, results = _run(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(results) == 2 * 4 * VARIANTS_PER_DTYPE  # 2 targets x 4 dtypes, nothing skipped
    for r in results:
        where = f"sm_{r['arch']} {r['kernel']} {r['variant']}"
        assert not r["errors"] and r["specializations"] >= 1, where
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        assert 0 < r["registers"] <= 255, where
        assert 0 < r["shared"] <= {80: 163, 90: 227}[r["arch"]] * 1024, where
        assert re.match(MMA[(r["dtype"], r["arch"])], r["mma"]), f"{where}: {r['mma']}"
    # the markdown table lists every variant for both targets
    assert proc.stdout.count("\n| `_") == len(results) // 2


def test_check_fails_on_a_config_that_spills(tmp_path):
    """Fault injection: two-head scoring with 128-row tiles (the old config) spills on sm_90."""
    proc, results = _run(tmp_path, "--dtypes", "bf16", "--kernels", "lse", "--archs", "90", "--force", "BM=128")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    spilled = {r["variant"] for r in results if r["spill_stores"] > 0}
    assert spilled == {"bf16 two_heads", "bf16 bias two_heads"}
    assert all(not r["ok"] for r in results if r["variant"] in spilled)


def test_bad_arguments_exit_2(tmp_path):
    proc, _ = _run(tmp_path, "--dtypes", "bf17")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["aot_check: --dtypes: unknown ['bf17']"]
