"""scripts/download.py."""

from conftest import run_script


def test_access_token_is_never_printed():
    proc = run_script("scripts/download.py", "--access_token", "hf_TopSecret123", "--print_config", check=False)
    assert proc.returncode == 0
    assert "access_token" in proc.stdout and "hf_TopSecret123" not in proc.stdout + proc.stderr
