"""The Triton code must not shadow the PyPI package `kernels`, which transformers probes for."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_in_repo_root(code: str) -> str:
    # The repo root is sys.path[0] when a user runs `python train.py`: reproduce that.
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_transformers_sees_no_kernels_package_from_repo_root():
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from transformers.utils import import_utils as u;"
        "print(u.is_kernels_available(), u._is_package_available('kernels', return_version=True)[0],"
        " getattr(sys.modules.get('kernels'), '__file__', None))"
    )
    # transformers may import the kernels/ directory as a PEP 420 namespace package while probing;
    # that is harmless as long as it is reported absent and nothing of ours (no __file__) is loaded
    assert _run_in_repo_root(code) == "False False None"


def test_kernels_dir_is_not_a_regular_package_and_ours_imports():
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert _run_in_repo_root("import cdpo_kernels, os; print(os.path.dirname(cdpo_kernels.__file__))") == str(
        REPO / "kernels" / "cdpo_kernels"
    )
