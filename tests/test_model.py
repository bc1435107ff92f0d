import pytest
import torch
from conftest import assert_clean_error, run_script

from lit_llama.generation import generate
from lit_llama.model import Config, LLaMA, llama_configs


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_kv_cache_matches_full_forward(name):
    torch.manual_seed(0)
    model = LLaMA.from_name(name).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(x)
        model.set_kv_cache(batch_size=2, max_seq_length=32)
        chunks = [model(x[:, a:b], torch.arange(a, b)) for a, b in ((0, 9), (9, 10), (10, 20))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_generation_with_kv_cache_equals_without(name):
    torch.manual_seed(0)
    model = LLaMA.from_name(name).eval()
    prompt = torch.randint(0, model.config.vocab_size, (7,))
    with_cache = generate(model, prompt, max_new_tokens=25, temperature=0)
    without_cache = generate(model, prompt, max_new_tokens=25, temperature=0, use_kv_cache=False)
    assert with_cache.shape == (32,)
    assert torch.equal(with_cache, without_cache)


def test_generation_stops_at_eos():
    torch.manual_seed(0)
    model = LLaMA.from_name("tiny").eval()
    prompt = torch.randint(0, model.config.vocab_size, (5,))
    greedy = generate(model, prompt, max_new_tokens=10, temperature=0)
    eos = greedy[7].item()  # pretend the third generated token is EOS
    first = (greedy[5:] == eos).nonzero()[0].item() + 5
    stopped = generate(model, prompt, max_new_tokens=10, temperature=0, eos_id=eos)
    assert torch.equal(stopped, greedy[: first + 1])


def test_named_sizes():
    assert Config.from_name("7B").intermediate_size == 11008
    assert Config.from_name("Llama-2-70b").n_query_groups == 8
    assert Config.from_name("TinyLlama-1.1B").head_size == 64
    # the 2/3 * 4 * n_embd rule, rounded to 256, gives LLaMA 7B's size
    assert Config(n_embd=4096, n_head=32).intermediate_size == 11008
    with pytest.raises(ValueError, match="unknown model size"):
        Config.from_name("8B")
    assert {"7B", "13B", "30B", "65B", "Llama-2-7b", "Llama-2-13b", "Llama-2-70b", "open_llama_3b",
            "open_llama_7b", "open_llama_13b", "TinyLlama-1.1B"} <= set(llama_configs)


def test_generate_script(tiny_checkpoint_dir):
    proc = run_script("generate.py", "--checkpoint_dir", tiny_checkpoint_dir, "--prompt", "explain weight decay",
                      "--max_new_tokens", 8, "--temperature", 0)
    assert "explain weight decay" in proc.stdout
    assert "tokens/s" in proc.stderr
    # the original Lit-LLaMA flags work too
    proc2 = run_script("generate.py", "--checkpoint_path", tiny_checkpoint_dir / "lit-llama.pth",
                       "--tokenizer_path", tiny_checkpoint_dir / "tokenizer.model", "--prompt", "explain weight decay",
                       "--max_new_tokens", 8, "--temperature", 0)
    assert proc2.stdout == proc.stdout


def test_generate_script_bad_input(tmp_path, tiny_checkpoint_dir, real_tokenizer_path):
    assert_clean_error(run_script("generate.py", "--checkpoint_dir", tmp_path / "missing", check=False),
                       "--checkpoint_dir")
    assert_clean_error(run_script("generate.py", "--checkpoint_dir", tmp_path, check=False), "lit-llama.pth")
    assert_clean_error(run_script("generate.py", "--checkpoint_dir", tiny_checkpoint_dir, "--tokenizer_path",
                                  real_tokenizer_path, check=False), "32000")
