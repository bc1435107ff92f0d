"""lit_llama/finetune.py and the three finetune scripts on it: one front end, the shared flags described once
(lit_llama/args.py) and still flat on the command line, in a --config YAML and from Python."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, assert_clean_error, load_script, make_arithmetic_run, run_script

from lit_llama.adapter import AdapterFinetune
from lit_llama.args import SHARED_ARGS
from lit_llama.cli import UserError
from lit_llama.finetune import FullFinetune, flag_parser, resolve_max_seq_length
from lit_llama.lora import LoRAFinetune
from lit_llama.model import Config

SHARED_FLAGS = (  # what each of the three scripts took before the shared flags moved to lit_llama/args.py
    "checkpoint_dir data_dir out_dir precision devices num_nodes strategy cpu_offload logger_name learning_rate "
    "batch_size micro_batch_size max_iters epochs warmup_iters weight_decay max_seq_length eval_interval "
    "eval_iters save_interval log_interval seed activation_checkpointing chunked_ce group_by_length packing compile resume "
    "pretrained_path tokenizer_path block_size"
).split()
OWN_FLAGS = {
    "lora": "lora_r lora_alpha lora_dropout lora_query lora_key lora_value lora_projection lora_mlp lora_head "
            "lora_rslora lora_dora quantize".split(),
    "adapter": "adapter_prompt_length adapter_start_layer adapter_version quantize".split(),
    "full": ["state_dict_type"],
}
METHODS = {"lora": LoRAFinetune, "adapter": AdapterFinetune, "full": FullFinetune}


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    return make_arithmetic_run(tmp_path_factory.mktemp("finetune"), records=24)


@pytest.mark.parametrize("script", ["lora", "adapter", "full"])
def test_help_lists_every_flag_with_its_help(script):
    out = run_script(f"finetune/{script}.py", "--help").stdout
    for flag in SHARED_FLAGS + OWN_FLAGS[script]:
        match = re.search(rf"^  --{flag}\b.*?(?=^  --|\Z)", out, re.MULTILINE | re.DOTALL)
        assert match, f"--{flag} is not in finetune/{script}.py --help"
        help_text = re.sub(r"\(type: .*", "", match.group(0), flags=re.DOTALL).split(maxsplit=1)[1:]
        assert help_text and len(help_text[0].split()) >= 3, f"--{flag} has no help of its own:\n{match.group(0)}"


def test_each_shared_flag_is_described_once():
    """In lit_llama/args.py, and in no finetune script."""
    names = [field for group in SHARED_ARGS for field in group.__dataclass_fields__]
    assert sorted(names) == sorted(SHARED_FLAGS)
    for script in ("lora", "adapter", "full"):
        text = (REPO_ROOT / "finetune" / f"{script}.py").read_text()
        described = [name for name in names if re.search(rf"^\s+{name}:", text, re.MULTILINE)]
        assert described == [], f"finetune/{script}.py describes shared flags again: {described}"


@pytest.mark.parametrize("script", ["lora", "adapter", "full"])
def test_each_method_has_its_defaults(script):
    method = METHODS[script]
    flags = flag_parser(load_script(f"finetune/{script}.py").__dict__[script], method.flag_defaults).parse_args([])
    for name, value in method.flag_defaults.items():
        assert flags[name] == value
    assert {"lora": 3e-4, "adapter": 9e-3, "full": 3e-5}[script] == flags["learning_rate"]


@pytest.mark.slow
def test_flat_flags_in_a_yaml_config_and_on_the_command_line(arithmetic_run, tmp_path):
    """A --config file uses the same flat names as the command line; a flag after it wins."""
    checkpoint_dir, data_dir = arithmetic_run
    config = tmp_path / "lora.yaml"
    config.write_text(f"checkpoint_dir: {checkpoint_dir}\ndata_dir: {data_dir}\nlearning_rate: 0.002\nlora_r: 4\n"
                      "batch_size: 4\nmicro_batch_size: 2\nmax_iters: 4\neval_iters: 1\nprecision: 32-true\n")
    run_script("finetune/lora.py", "--config", config, "--out_dir", tmp_path / "out", "--max_iters", 2)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["lora"]["r"] == 4 and run["training"]["learning_rate"] == 0.002 and run["training"]["max_iters"] == 2


def test_from_python_the_flags_are_checked_as_on_the_command_line(tmp_path):
    with pytest.raises(Exception, match="bogus"):
        load_script("finetune/lora.py").setup(bogus=1, out_dir=tmp_path)
    proc = run_script("finetune/lora.py", "--bogus", 1, check=False)
    assert_clean_error(proc, "bogus")


def test_finetune_scripts_are_short_and_repeat_no_block():
    """The scripts hold only their method's flags: under 100 lines, no six lines in a row shared by two."""
    windows = {}
    for script in ("lora", "adapter", "full"):
        lines = [line.strip() for line in (REPO_ROOT / "finetune" / f"{script}.py").read_text().splitlines()]
        assert len(lines) < 100, f"finetune/{script}.py has {len(lines)} lines"
        code = [line for line in lines if line and not line.startswith(("#", "import ", "from "))]
        for i in range(len(code) - 5):
            windows.setdefault(tuple(code[i : i + 6]), set()).add(script)
    repeated = [block for block, scripts in windows.items() if len(scripts) > 1]
    assert not repeated, f"repeated between finetune scripts: {repeated[0]}"


def test_method_objects_say_what_run_json_records(tiny_checkpoint_dir):
    from lit_llama.args import RunArgs
    from lit_llama.checkpoint import resolve_checkpoint

    config = resolve_checkpoint(Path(tiny_checkpoint_dir)).config
    run = RunArgs()
    assert set(load_script("finetune/lora.py").lora().configure(config, run)) == {"lora", "quantize"}
    adapter = load_script("finetune/adapter.py").adapter()
    assert adapter.configure(config, run)["adapter"]["adapter_start_layer"] == 1  # tiny has 2 layers
    assert adapter.default_out_dir() == Path("out/adapter/alpaca")
    assert FullFinetune().configure(config, run) == {}


def test_block_size_is_a_deprecated_name_of_max_seq_length(capsys):
    tiny = Config.from_name("tiny")  # a context of 256 tokens
    assert resolve_max_seq_length(None, None, tiny) == 256  # 512 by default, but no longer than that
    assert resolve_max_seq_length(128, None, tiny) == 128
    assert resolve_max_seq_length(None, 64, tiny) == 64
    assert "--block_size is deprecated: use --max_seq_length" in capsys.readouterr().err
    with pytest.raises(UserError, match="--max_seq_length 300 is longer than the model's context"):
        resolve_max_seq_length(300, None, tiny)


@pytest.mark.slow
def test_adapter_on_a_two_layer_model_with_default_settings(arithmetic_run, tmp_path):
    """The article's start layer 2 does not exist in a 2-layer model: the default adapts its last layer."""
    checkpoint_dir, data_dir = arithmetic_run
    finetune = load_script("finetune/adapter.py")
    finetune.setup(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=tmp_path / "out",
                   precision="32-true", batch_size=2, micro_batch_size=2, max_iters=2, eval_interval=0, eval_iters=1,
                   save_interval=0)
    saved = torch.load(tmp_path / "out" / "lit-llama-adapter-finetuned.pth")
    assert saved["adapter_config"]["adapter_start_layer"] == 1


@pytest.mark.slow  # compiles a block twice (~10 s)
def test_compiled_blocks_take_packed_rows_of_any_layout_without_recompiling():
    """--compile with --packing: micro-batches whose rows hold other numbers of examples at other places go
    through the same compiled graph (the spans become a mask tensor before the compiled block; traced as a
    list, each new layout compiled a new graph until dynamo's recompile limit), with the eager model's output."""
    from torch._dynamo.utils import counters

    from lit_llama.finetune import compile_blocks
    from lit_llama.model import LLaMA

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = LLaMA.from_name("tiny").train()
    model = LLaMA.from_name("tiny").train()
    model.load_state_dict(eager.state_dict())
    compile_blocks(model)
    layouts = [[[5, 9]], [[3, 4, 7], [14]], [[2, 12], [6, 8], [4, 4, 6]], [[10, 1, 3]], [[1, 1, 1, 11], [7, 7]]]
    for rows in layouts:
        positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
        idx = torch.randint(0, 512, positions.shape)
        expected = eager(idx, positions=positions)
        assert torch.allclose(model(idx, positions=positions), expected, atol=1e-5 * expected.abs().max().item())
    assert counters["stats"]["unique_graphs"] <= 2  # a static first graph, then one dynamic one
