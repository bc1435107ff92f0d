"""lit_llama/cli.py: what every script's command line shares."""

import pytest
import torch

from lit_llama.cli import UserError, check_torch_version


def test_torch_whose_load_can_run_code_is_refused():
    with pytest.raises(UserError, match=r"torch 2\.5\.1 is too old: .* >= 2\.6"):
        check_torch_version("2.5.1")
    check_torch_version("2.6.0+cpu")
    check_torch_version(torch.__version__)
