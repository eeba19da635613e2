"""The native kernels against their torch references (tests/native/kernel_checks.py): on CUDA, and on the CPU
through Triton's interpreter; plus the rule that picks a kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.native import TRITON_AVAILABLE, TRITON_INTERPRETED, kernel_mode, kernels_enabled, use_triton
from kernel_checks import CUDA_CHECKS  # tests/native is on sys.path (pytest rootdir-less layout)

CHECKS_SCRIPT = Path(__file__).with_name("kernel_checks.py")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("check", CUDA_CHECKS, ids=lambda c: c.__name__)
def test_kernel_matches_its_reference_on_cuda(check) -> None:
    check("cuda")


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs triton (pip install -e .[test])")
def test_kernels_match_their_references_under_the_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(CHECKS_SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("ok check_") == 4


@pytest.mark.skipif(TRITON_INTERPRETED, reason="the interpreter runs the kernels on CPU tensors on purpose")
def test_cpu_tensors_take_the_reference_path() -> None:
    assert not use_triton(torch.zeros(2))


def test_kernel_mode_switches_the_fast_paths_off_and_back() -> None:
    with kernel_mode("torch"):
        assert not kernels_enabled() and not use_triton(torch.zeros(2))
    assert kernels_enabled()
    with pytest.raises(ValueError, match="kernel mode"):
        with kernel_mode("fast"):
            pass
