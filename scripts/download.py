"""Download a LLaMA-architecture model from the Hugging Face hub: only what the converter needs.

    python scripts/download.py --repo_id openlm-research/open_llama_3b
    python scripts/download.py --repo_id meta-llama/Llama-2-7b-hf --access_token hf_...  # gated: accept its licence
    python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct  # also Llama 3.x, Qwen2.5, Mistral

writes checkpoints/hf/<repo_id>/ (config.json, the tokenizer files, the weights); then run
scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/hf/<repo_id>.
"""

import os
import sys
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator, List, Optional

from jsonargparse.typing import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.cli import UserError, check_out_dir, deprecated_flag, run_cli

# the converter reads config.json and a tokenizer: LLaMA's SentencePiece tokenizer.model or a Hugging Face
# tokenizer.json (Llama 3, SmolLM2, Qwen2.5); the settings files beside it say bos, eos and the stop tokens
REQUIRED_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
TOKENIZER_SETTINGS = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
# safetensors preferred (faster, safer to load); pickled .bin only where a repository has nothing else
WEIGHT_PATTERNS = (
    ("model*.safetensors", "model.safetensors.index.json"),
    ("pytorch_model*.bin", "pytorch_model.bin.index.json"),
)


def main(
    repo_id: str = "openlm-research/open_llama_3b",
    access_token: Optional[SecretStr] = None,
    out_dir: Path = Path("checkpoints/hf"),
    checkpoint_dir: Optional[Path] = None,
) -> None:
    """Downloads config.json, the tokenizer files and the weights of a Hugging Face model repository.

    Args:
        repo_id: The repository, e.g. openlm-research/open_llama_3b, meta-llama/Llama-2-7b-hf,
            TinyLlama/TinyLlama-1.1B-Chat-v1.0, meta-llama/Llama-3.2-1B-Instruct, HuggingFaceTB/SmolLM2-135M,
            Qwen/Qwen2.5-0.5B-Instruct or mistralai/Mistral-7B-Instruct-v0.3 (howto/download_weights.md lists them).
        access_token: A Hugging Face token, needed for gated models such as Meta's Llama 2 (default: the
            HF_TOKEN environment variable). Never printed, also not by --print_config.
        out_dir: The folder to download into; the files go to <out_dir>/<repo_id>.
        checkpoint_dir: Deprecated name of --out_dir.
    """
    from huggingface_hub import HfApi, snapshot_download

    out_dir = deprecated_flag("out_dir", out_dir, "checkpoint_dir", checkpoint_dir)
    check_out_dir(out_dir)
    check_repo_id(repo_id)  # also keeps <out_dir>/<repo_id> inside --out_dir
    token = access_token.get_secret_value() if access_token is not None else os.getenv("HF_TOKEN")
    local_dir = Path(out_dir) / repo_id
    limit_hub_waits()
    check_hub_answers(repo_id)
    with hub_errors(repo_id, token):
        files = HfApi().list_repo_files(repo_id, token=token)
    patterns = download_patterns(repo_id, files)
    with hub_errors(repo_id, token):
        snapshot_download(repo_id, local_dir=local_dir, allow_patterns=patterns, token=token)
    print(f"Downloaded {repo_id} to {local_dir}")
    print(f"Next: python scripts/convert_hf_checkpoint.py --checkpoint_dir {local_dir}")


def download_patterns(repo_id: str, files: List[str]) -> List[str]:
    """Decides from the repository's file list what to fetch, before downloading gigabytes of it."""
    for name in REQUIRED_FILES:
        if name not in files:
            raise UserError(f"{repo_id} has no {name}: it is not a Hugging Face transformers model")
    tokenizer = [name for name in TOKENIZER_FILES + TOKENIZER_SETTINGS if name in files]
    if not set(tokenizer) & set(TOKENIZER_FILES):
        raise UserError(f"{repo_id} has no {' or '.join(TOKENIZER_FILES)}: a tokenizer is needed")
    for weights, index in WEIGHT_PATTERNS:
        if any(fnmatch(f, weights) for f in files):
            return [*REQUIRED_FILES, *tokenizer, weights, index]
    raise UserError(f"{repo_id} has no weights in Hugging Face format (model*.safetensors or pytorch_model*.bin)")


@contextmanager
def hub_errors(repo_id: str, token: Optional[str] = None) -> Iterator[None]:
    """Turns the hub's exceptions into one line: unreachable, gated, not found or refused. The access
    token never shows, even where the hub's message repeats the request."""
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        yield
    except GatedRepoError:  # before RepositoryNotFoundError, its parent class
        raise UserError(
            f"{repo_id} is gated: accept its licence on https://huggingface.co/{repo_id} and pass "
            "--access_token (or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} not found on the Hugging Face hub (private? pass --access_token)") from None
    except HfHubHTTPError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if token:
            reason = reason.replace(token, "**********")
        raise UserError(f"the Hugging Face hub refused to give {repo_id}: {reason}") from None
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a network failure
        if not is_network_error(e):
            raise
        offline = os.getenv("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        raise UserError(
            f"could not reach the Hugging Face hub to download {repo_id}: this step needs network access"
            + (" (HF_HUB_OFFLINE is set)" if offline else "")
        ) from None


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"--repo_id {repo_id!r} is not a Hugging Face repository id: expected owner/name (letters, digits, "
            "'-', '_', '.'), e.g. openlm-research/open_llama_3b"
        ) from None


def hub_timeout() -> float:
    """Seconds to wait for the hub to answer a request: huggingface_hub's own setting for metadata requests."""
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT)


def limit_hub_waits() -> None:
    """huggingface_hub >= 1.0 makes its API requests (the file list) without a timeout: one that is never
    answered would wait forever. Its downloads have their own timeout (HF_HUB_DOWNLOAD_TIMEOUT)."""
    import huggingface_hub

    if not hasattr(huggingface_hub, "set_client_factory"):
        return  # older versions (requests) pass their timeouts themselves
    from huggingface_hub.utils._http import default_client_factory

    def client_with_timeout():
        client = default_client_factory()
        client.timeout = hub_timeout()
        return client

    huggingface_hub.set_client_factory(client_with_timeout)


def check_hub_answers(repo_id: str) -> None:
    """Fails at once, in one line, where the hub's name does not resolve (no network) or the hub does not
    answer, instead of after the client's retries and their log lines."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if os.getenv("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return  # the client itself says offline mode
    endpoint = constants.ENDPOINT
    host = urlparse(endpoint).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise UserError(
            f"could not reach the Hugging Face hub ({host}) to download {repo_id}: this step needs network access"
        ) from None
    try:
        get_session().head(endpoint, timeout=hub_timeout())  # any answer will do: an error status is an answer
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a network failure
        if not is_network_error(e):
            raise
        what = f"did not answer within {hub_timeout():g} s" if "Timeout" in type(e).__name__ else "could not be reached"
        raise UserError(
            f"the Hugging Face hub at {endpoint} {what} (to download {repo_id}; HF_HUB_ETAG_TIMEOUT sets the wait)"
        ) from None


def is_network_error(exc: BaseException) -> bool:
    # OfflineModeIsEnabled and requests' errors are OSErrors; newer huggingface_hub versions use httpx,
    # whose errors are not, so those are recognised by the module that defines them
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError) or module in ("requests", "urllib3", "httpx", "httpx2", "httpcore")


if __name__ == "__main__":
    run_cli(main)
