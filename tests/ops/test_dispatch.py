"""The ops dispatcher: one switch forces every op's reference twin."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hybridlm import ops


def test_use_impl_forces_the_reference_and_restores_the_previous_choice():
    assert ops.current_impl() == "auto"
    with ops.use_impl("reference"):
        assert ops.current_impl() == "reference"
        assert not ops.fast_path_enabled(torch.zeros(1))
    assert ops.current_impl() == "auto"


def test_a_cpu_tensor_never_takes_a_cuda_fast_path():
    assert not ops.fast_path_enabled(torch.zeros(1))


@pytest.mark.parametrize("bad", ["fast", "", "Reference"])
def test_an_unknown_implementation_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="allowed"):
        ops.set_impl(bad)
    assert ops.current_impl() == "auto"


def test_the_environment_variable_sets_the_process_default():
    code = "from hybridlm import ops; print(ops.current_impl())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"HYBRIDLM_OPS": "reference", "PATH": ""}, check=True)
    assert out.stdout.strip() == "reference"
