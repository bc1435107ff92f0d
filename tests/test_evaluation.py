"""lit_llama/evaluation.py and scripts/evaluate.py: our model as lm-eval's LM against lm-eval's own Hugging Face
backend (HFLM) on the same weights, the shipped offline tasks, perplexity, LoRA, and bad input."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_script

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install lm-eval (the eval extra)")
transformers = pytest.importorskip("transformers")

from lit_llama.checkpoint import load_model, resolve_checkpoint  # noqa: E402
from lit_llama.tokenizer import Tokenizer  # noqa: E402

MAX_LENGTH = 48  # short, so that the perplexity text and long documents take several rolling windows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with tied embeddings and a tokenizer.json (SmolLM2's layout) in Hugging Face form,
    and our float32 conversion of it."""
    from test_families import make_family_dir

    root = tmp_path_factory.mktemp("eval")
    make_family_dir(root / "hf", "llama-tied")
    run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", root / "hf", "--out_dir", root / "lit",
               "--dtype", "float32")
    return root


def lit_lm(checkpoint_dir: Path, batch_size: int = 4):
    from lit_llama.evaluation import LitLM

    paths = resolve_checkpoint(checkpoint_dir)
    model = load_model(paths, torch.device("cpu"), torch.float32).eval()
    return LitLM(model, Tokenizer(paths.tokenizer), batch_size=batch_size, max_length=MAX_LENGTH)


def task_requests(name: str, limit: int):
    """The requests lm-eval makes for the first `limit` documents of a task of this package."""
    from lit_llama.evaluation import load_tasks, task_manager

    task = load_tasks([name], task_manager([name]))[name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task.instances


def test_same_as_lm_eval_hf_backend(tiny):
    """loglikelihood (multiple choice), loglikelihood_rolling and generate_until on the same float32 weights:
    ours and HFLM's agree (loglikelihoods within 1e-4: float32 rounding of sums of ~10-50 log-probabilities),
    batched with padding (4 per batch, sequences of different lengths)."""
    from lm_eval.models.huggingface import HFLM

    ours = lit_lm(tiny / "lit")
    theirs = HFLM(pretrained=str(tiny / "hf"), device="cpu", dtype="float32", batch_size=4, max_length=MAX_LENGTH)

    choice = task_requests("lit_demo_choice", limit=6)  # 24 requests (4 choices each)
    a, b = ours.loglikelihood(choice), theirs.loglikelihood(choice)
    assert len(a) == len(b) == 24
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) < 1e-4
    assert [x[1] for x in a] == [y[1] for y in b]
    assert len({round(x[0], 3) for x in a}) > 12  # real, differing scores (not one constant)

    texts = [(Path(__file__).parents[1] / "README.md").read_text()[:1500], "A short text.", "Two\nlines."]
    rolling = [type("Request", (), {"args": (text,)})() for text in texts]
    a, b = ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling)
    assert len(ours.tok_encode(texts[0])) > 3 * MAX_LENGTH  # several windows
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4 * max(1.0, max(abs(y) for y in b) / 100)

    answer = task_requests("lit_demo_answer", limit=5)
    generated = ours.generate_until(answer)
    assert generated == theirs.generate_until(answer)
    assert all("\n" not in text for text in generated) and any(text.strip() for text in generated)


def test_evaluate_script(tiny, tmp_path):
    """The script on the shipped tasks and a text file: the metrics lm-eval computes from our scores, the
    perplexity from the rolling loglikelihood; a LoRA file (random, nonzero B) changes the scores; and bad input."""
    from lit_llama.lora import LoRAConfig, LoRALLaMA, base_fingerprint, lora_state_dict
    from lit_llama.model import Config

    text = tmp_path / "text.txt"
    text.write_text((Path(__file__).parents[1] / "README.md").read_text()[:1200])
    out = tmp_path / "base.json"
    proc = run_script("scripts/evaluate.py", "--checkpoint_dir", tiny / "lit", "--tasks", "[lit_demo_choice]",
                      "--limit", "8", "--max_length", MAX_LENGTH, "--perplexity_file", text, "--output", out)
    base = json.loads(out.read_text())
    metrics = base["tasks"]["lit_demo_choice"]
    assert metrics["documents"] == 8 and set(metrics["metrics"]) == {"acc", "acc_norm"}
    assert all(0 <= v <= 1 and v * 8 == round(v * 8) for v in metrics["metrics"].values())
    assert "| lit_demo_choice | acc |" in proc.stdout and "| text.txt | perplexity |" in proc.stdout
    logprob, tokens = lit_lm(tiny / "lit").rolling([text.read_text()])[0]
    assert base["perplexity"]["tokens"] == tokens
    assert base["perplexity"]["perplexity"] == pytest.approx(math.exp(-logprob / tokens), rel=1e-5)

    # a LoRA on this base, merged at load: other scores
    config = Config.from_json(tiny / "lit" / "lit_config.json")
    torch.manual_seed(0)
    lora_model = LoRALLaMA(config, lora=LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for layer in lora_model.lora_layers():
            layer.lora_B.normal_(0, 0.5)
    torch.save(lora_state_dict(lora_model, base_model=base_fingerprint(tiny / "lit" / "lit-llama.pth")),
               tmp_path / "lora.pth")
    run_script("scripts/evaluate.py", "--checkpoint_dir", tiny / "lit", "--lora_path", tmp_path / "lora.pth",
               "--max_length", MAX_LENGTH, "--perplexity_file", text, "--output", tmp_path / "lora.json")
    lora = json.loads((tmp_path / "lora.json").read_text())
    assert lora["lora_path"] == str(tmp_path / "lora.pth")
    assert lora["perplexity"]["tokens"] == tokens
    assert abs(math.log(lora["perplexity"]["perplexity"] / base["perplexity"]["perplexity"])) > 1e-3

    # bad input: one error line each
    other = tmp_path / "other_base"  # the same shape, other weights: the LoRA does not belong to it
    shutil.copytree(tiny / "lit", other)
    torch.manual_seed(1)
    from lit_llama.model import LLaMA

    torch.save(LLaMA(config).state_dict(), other / "lit-llama.pth")
    evaluate = ("scripts/evaluate.py", "--checkpoint_dir")
    assert_clean_error(run_script(*evaluate, other, "--lora_path", tmp_path / "lora.pth", "--perplexity_file",
                                  text, check=False), "lora.pth was trained on the base model")
    assert_clean_error(run_script(*evaluate, tiny / "lit", "--lora_path", tmp_path / "lora.pth", "--adapter_path",
                                  tmp_path / "lora.pth", "--perplexity_file", text, check=False),
                       "--lora_path or --adapter_path, not both")
    assert_clean_error(run_script(*evaluate, tiny / "lit", check=False), "nothing to evaluate")
    assert_clean_error(run_script(*evaluate, tiny / "lit", "--tasks", "[no_such.yaml]", check=False),
                       "task file no_such.yaml does not exist")


def test_unreachable_dataset_and_unknown_task(tiny, tmp_path, monkeypatch):
    """A task whose dataset is on the Hugging Face hub, offline (HF_DATASETS_OFFLINE=1, not cached), and a task
    name that exists nowhere (the one case that indexes lm-eval's whole catalogue: the slow part here)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    task = tmp_path / "hub_task.yaml"
    task.write_text("task: hub_task\ndataset_path: lit-llama-tests/no-such-dataset\ntest_split: test\n"
                    "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\n"
                    "doc_to_target: 0\n")
    evaluate = ("scripts/evaluate.py", "--checkpoint_dir", tiny / "lit")
    assert_clean_error(run_script(*evaluate, "--tasks", f"[{task}]", check=False),
                       "cannot be reached", "HF_DATASETS_OFFLINE=1", "lit-llama-tests/no-such-dataset")
    assert_clean_error(run_script(*evaluate, "--tasks", "[lit_demo_choise]", check=False),
                       "no task named 'lit_demo_choise'", "lit_demo_choice")


def test_same_as_lm_eval_hf_backend_on_smollm2(smollm2_checkpoint_dir, tmp_path):
    """The same check on the real SmolLM2-135M-Instruct (float32), on a few documents: ours as converted from the
    GGUF file, HFLM on its export to Hugging Face form (scripts/export_hf.py)."""
    from lm_eval.models.huggingface import HFLM

    run_script("scripts/export_hf.py", "--checkpoint_dir", smollm2_checkpoint_dir, "--out_dir", tmp_path / "hf")
    ours = lit_lm(smollm2_checkpoint_dir)
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32", batch_size=4,
                  max_length=MAX_LENGTH)
    choice = task_requests("lit_demo_choice", limit=3)
    a, b = ours.loglikelihood(choice), theirs.loglikelihood(choice)
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) < 1e-4
    assert [x[1] for x in a] == [y[1] for y in b]
    text = [type("Request", (), {"args": ((Path(__file__).parents[1] / "README.md").read_text()[:600],)})()]
    # a sum over ~150 tokens in 4 windows: float32 rounding of each token's log-probability adds up (1e-5 each)
    assert abs(ours.loglikelihood_rolling(text)[0] - theirs.loglikelihood_rolling(text)[0]) < 1e-3
