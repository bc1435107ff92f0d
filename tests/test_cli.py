"""lit_llama/cli.py: what every script's command line shares."""

import pytest
import torch

from conftest import run_script
from lit_llama.cli import UserError, check_torch_version


def test_torch_whose_load_can_run_code_is_refused():
    with pytest.raises(UserError, match=r"torch 2\.5\.1 is too old: .* >= 2\.6"):
        check_torch_version("2.5.1")
    check_torch_version("2.6.0+cpu")
    check_torch_version(torch.__version__)


@pytest.mark.parametrize("old, new", [("convert_checkpoint.py", "convert_meta_checkpoint.py"),
                                      ("import_peft.py", "convert_peft_checkpoint.py"),
                                      ("convert_lit_checkpoint.py", "export_hf.py")])
def test_renamed_scripts_still_run_under_their_old_names(old, new):
    proc = run_script(f"scripts/{old}", "--help")
    assert f"note: scripts/{old} is now scripts/{new}" in proc.stderr
    assert proc.stdout == run_script(f"scripts/{new}", "--help").stdout
