from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="lit-llama",
    version="0.1.0",
    description="Readable LLaMA finetuning with LoRA, LLaMA-Adapter and full finetuning on Lightning Fabric",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["lit_llama", "lit_llama.*"]),
    # the offline demo's instruction set; serve.py's comparison page
    # (and scripts/evaluate.py's offline tasks: lm-eval task files and the code that builds their documents)
    package_data={"lit_llama": ["demo_instructions.json", "web/*", "eval_tasks/*.yaml", "eval_tasks/*.py"]},
    python_requires=">=3.10",  # dataclass(kw_only=True)
    # The supported range: from the oldest releases tested (tests/oldest-versions.txt, all at once) to the
    # newest each bound allows (what a fresh `pip install` resolves; .ci/run tests it). Upper bounds only where
    # a release is known to break.
    install_requires=[
        "torch>=2.13",  # also: torch.load reads only tensors by default (2.6): a checkpoint cannot run code
        "lightning>=2.5",  # Fabric's ModelParallelStrategy (FSDP2)
        "sentencepiece",  # LLaMA's and Llama 2's tokenizer.model
        "tokenizers>=0.22",  # Hugging Face tokenizer.json files: Llama 3, SmolLM2, Qwen2.5
        "tqdm",
        "jsonargparse[signatures]>=4.27",
    ],
    extras_require={
        # what the scripts use beyond training: downloads, safetensors checkpoints, comparison plots
        "all": ["huggingface_hub>=0.34", "safetensors", "matplotlib", "pyyaml", "torchao>=0.14",
                # serve.py's web server (its batching worker is ours: lit_llama/serving.py)
                "fastapi>=0.112", "uvicorn>=0.29",
                # GGUF in and out (scripts/convert_gguf_checkpoint.py, export_gguf.py): 0.10 dequantizes every
                # type read there in numpy; tokenizers builds the tokenizer.json of byte-level BPE vocabularies
                "gguf>=0.10", "tokenizers>=0.22"],
        # scripts/evaluate.py: lm-evaluation-harness with our model as its LM (lit_llama/evaluation.py). Tested with
        # 0.4.13; 0.4.9 is the oldest believed to work (task files that build their documents in code), not yet run
        "eval": ["lm-eval>=0.4.9"],
        # --logger_name tensorboard / wandb in the finetune scripts
        "loggers": ["tensorboard", "wandb"],
        # the reference implementations the tests and benchmarks compare against, and the loggers they read back
        "test": ["pytest", "pytest-xdist>=3.5",  # the tests run on every core: `pytest tests -n auto`
                 "hypothesis", "transformers>=4.57", "peft>=0.17", "safetensors", "matplotlib",
                 "tensorboard", "wandb", "openai>=1.0",  # openai: the client tests/test_serve.py talks to serve.py with
                 "websockets>=12",  # Chromium's DevTools protocol, for the browser test of the comparison page
                 "lm-eval>=0.4.9"],  # tests/test_evaluation.py: our LM against lm-eval's Hugging Face backend
    },
)
