"""peft's and transformers' refusals of a model setting are one line naming the setting, not a traceback."""

import importlib.util

import pytest

from alignfast.ops import AlignfastArgumentError
from tests.trainer.tiny import echo_trainer, small_world


def test_lora_target_modules_that_match_nothing_name_the_setting(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig

    tok, prompter_dir = small_world(tmp_path)
    bad = LoraConfig(r=4, target_modules=["q_projj"], task_type="CAUSAL_LM")
    with pytest.raises(AlignfastArgumentError, match=r"argument 'peft_config' target_modules \(q_projj\) cannot be "
                                                     r"applied: .*\(prompter.lora.target_modules in a run file\)"):
        echo_trainer(tok, prompter_dir, output_dir=str(tmp_path / "o"), peft_config=bad)


@pytest.mark.parametrize("name", ["sdpaa", "flash_attention_2"])
def test_an_attention_implementation_transformers_refuses_names_the_setting(tmp_path, name):
    from transformers import AutoModelForCausalLM

    from alignfast.rollout import HFEngine

    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed")
    tok, prompter_dir = small_world(tmp_path)
    with pytest.raises(AlignfastArgumentError, match=rf"argument 'attn_implementation' '{name}' cannot be used"):
        HFEngine(AutoModelForCausalLM.from_pretrained(prompter_dir), tok, attn_implementation=name)
    with pytest.raises(AlignfastArgumentError, match=rf"argument 'attn_implementation' '{name}' cannot be used"):
        HFEngine(str(prompter_dir), attn_implementation=name, device="cpu")
    from alignfast.cli.errors import in_run_file_terms

    assert in_run_file_terms("argument 'attn_implementation' 'x'").startswith("target.attn_implementation")
