"""`pytest -m cuda` must collect where the optional packages are missing: the GPU machine has no
package index, and one collection error there runs zero CUDA tests (issue 21, item 3)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("av", "optimum", "optimum.quanto", "diffusers", "bitsandbytes", "sageattention", "yunchang", "flash_attn")
# A None entry in sys.modules makes `import x` raise ImportError and importlib.util.find_spec(x)
# return None: to the test files and to transformers alike, the package is not installed.
COLLECT = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
import pytest
sys.exit(pytest.main(["-q", "--collect-only", "-m", "cuda", "-p", "no:cacheprovider", "tests"]))
"""


@pytest.mark.slow
def test_cuda_tests_collect_without_optional_packages():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", COLLECT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    collected = [line for line in done.stdout.splitlines() if "::test_" in line]
    assert len(collected) >= 10, done.stdout[-2000:]  # 16 CUDA tests at the time of writing
    assert "error" not in done.stdout.splitlines()[-1].lower(), done.stdout[-2000:]
