"""AlignerTrainer: it learns the corrections, resumes exactly, writes metrics.jsonl, trains LoRA adapters, and
the fast and reference backends train the same model."""

import json
import re

import pytest
import torch

from alignfast.aligner import AlignerConfig, AlignerPipeline, AlignerTrainer, Corrector
from alignfast.ops import AlignfastArgumentError, cpu_gemm
from tests.aligner.helpers import ROWS, TEMPLATE, bpe_tokenizer, tiny_corrector
from alignfast.trainer.data import batch_indices
from tests.trainer.tiny import FunctionTarget


def _config(tmp_path, name="out", **kw):
    base = dict(output_dir=str(tmp_path / name), template=TEMPLATE, learning_rate=1e-2, per_device_train_batch_size=3,
                gradient_accumulation_steps=2, max_steps=6, save_strategy="no", logging_steps=1, seed=0,
                warmup_ratio=0.0)
    return AlignerConfig(**{**base, **kw})


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _reset(model, params):
    """Every parameter back to `params` (a _params snapshot), for the next run from the same start."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])


def test_sft_learns_the_corrections_and_the_pipeline_applies_them(tmp_path):
    model, tok = tiny_corrector(tmp_path, hidden=32)
    trainer = AlignerTrainer(_config(tmp_path, max_steps=80, per_device_train_batch_size=6,
                                     gradient_accumulation_steps=1), model, tok, train_dataset=ROWS,
                             eval_dataset=ROWS)
    before = trainer.evaluate()["eval/loss"]
    out = trainer.train()
    assert out.metrics["eval/loss"] < 0.1 < before
    trainer.save_model(tmp_path / "final")
    upstream = FunctionTarget(lambda q: "a dog", tok)
    pipe = AlignerPipeline(upstream, tmp_path / "final", upstream_tokenizer=tok, upstream_max_new_tokens=4,
                           max_new_tokens=8)
    assert pipe.corrector.max_new_tokens == 8
    got = pipe(["what is the cat", "what is the bird", "what is a dog"])
    assert [g.answer for g in got] == ["a dog"] * 3  # the upstream's answers, corrected by the SFT corrector
    assert [g.correction for g in got] == ["a cat", "a bird", "a dog"]
    assert upstream.calls == 1
    assert not any(g.truncated for g in got)
    pipe.corrector.max_new_tokens = 1  # a correction cut before its EOS says so
    assert [(g.correction, g.truncated) for g in pipe(["what is the cat"], answers=["a dog"])] == [("a", True)]


def test_resume_is_exact_and_metrics_cover_every_step(tmp_path):
    model, tok = tiny_corrector(tmp_path)
    init = _params(model)
    full = AlignerTrainer(_config(tmp_path, "full"), model, tok, train_dataset=ROWS)
    full.train()
    want = _params(full.model)

    stopped = AlignerTrainer(_config(tmp_path, "part", save_strategy="steps", save_steps=2, max_steps=6), model, tok,
                             train_dataset=ROWS)
    with torch.no_grad():
        for n, p in stopped.model.named_parameters():
            p.copy_(init[n])

    class StopAt3:
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step == 3

    stopped.callbacks.callbacks.append(StopAt3())
    stopped.train()  # stops after step 3 and checkpoints there
    model2, _ = tiny_corrector(tmp_path / "other", seed=9)  # different weights: everything comes from the checkpoint
    resumed = AlignerTrainer(_config(tmp_path, "part", save_strategy="steps", save_steps=2), model2, tok,
                             train_dataset=ROWS)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.global_step == 6
    for n, p in _params(resumed.model).items():
        assert torch.equal(p, want[n]), n
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    full_lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert [x["loss"] for x in lines] == [x["loss"] for x in full_lines]
    assert {"loss", "grad_norm", "learning_rate", "epoch", "num_tokens", "tokens/s"} <= set(lines[0])


def test_a_resume_that_does_not_match_the_checkpoint_is_one_line(tmp_path, caplog):
    """Resuming did not check that the checkpoint was this run's: a LoRA run resumed without LoRA or with other
    target_modules ended in a traceback (KeyError / ValueError from inside the copy), a LoRA run resumed silently
    onto another base model, and another training set resumed silently. The first three are now one line naming
    the checkpoint and the difference; other training rows are a warning, as other settings are. The same base
    model loaded in another dtype was refused as "trained from another model ... (same architecture, other
    weights?)", though the fingerprint differed by its dtype; the message now names that cause too."""
    peft = pytest.importorskip("peft")
    from alignfast.trainer.resume_checks import CheckpointMismatchError

    def lora(modules):
        return peft.LoraConfig(r=4, target_modules=modules, task_type="CAUSAL_LM")

    def run(folder, model, *, peft_config=None, rows=ROWS, max_steps=2):
        return AlignerTrainer(_config(tmp_path, "run", save_strategy="steps", save_steps=2, max_steps=max_steps,
                                      per_device_train_batch_size=2, gradient_accumulation_steps=1), model, tok,
                              train_dataset=rows, peft_config=peft_config)

    model, tok = tiny_corrector(tmp_path / "base")
    run("run", model, peft_config=lora(["q_proj"])).train()
    checkpoint = f"cannot resume from {tmp_path / 'run' / 'checkpoint-2'}: "
    cases = [(tiny_corrector(tmp_path / "a")[0], None, "it holds corrector parameter .*lora_A.*, which this "
                                                       "corrector does not have"),
             (tiny_corrector(tmp_path / "b")[0], lora("all-linear"), "it does not hold trainable corrector "
                                                                    "parameter .*lora_A"),
             (tiny_corrector(tmp_path / "c", seed=1)[0], lora(["q_proj"]),
              "it was trained from other frozen weights: the corrector's frozen base weights"),
             (tiny_corrector(tmp_path / "f")[0].double(), lora(["q_proj"]),  # the same base model, in float64
              "it was trained from other frozen weights: .* or this one loaded in another dtype\\?")]
    for other, peft_config, message in cases:
        with pytest.raises(CheckpointMismatchError, match=re.escape(checkpoint) + message):
            run("run", other, peft_config=peft_config, max_steps=4).train(resume_from_checkpoint=True)

    resumed = run("run", tiny_corrector(tmp_path / "d")[0], peft_config=lora(["q_proj"]), rows=ROWS[:4], max_steps=3)
    with caplog.at_level("WARNING", logger="alignfast.aligner"):
        assert resumed.train(resume_from_checkpoint=True).global_step == 3
    assert "with 4 training rows where the checkpoint's run had 6" in caplog.text
    caplog.clear()
    again = run("run", tiny_corrector(tmp_path / "e")[0], peft_config=lora(["q_proj"]), rows=ROWS[4:] + ROWS[:2],
                max_steps=4)
    with caplog.at_level("WARNING", logger="alignfast.aligner"):
        assert again.train(resume_from_checkpoint=True).global_step == 4
    assert "other training rows than the checkpoint's run (as many, 4, but other rows" in caplog.text


def test_cosine_schedule_with_warmup(tmp_path):
    model, tok = tiny_corrector(tmp_path)
    trainer = AlignerTrainer(_config(tmp_path, max_steps=10, warmup_ratio=0.2, lr_scheduler_type="cosine"), model, tok,
                             train_dataset=ROWS)
    lrs = [h["learning_rate"] for h in trainer.train().history]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-3) and lrs[2] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 1e-3


def test_fast_and_reference_backends_train_the_same_model(tmp_path):
    model, tok = tiny_corrector(tmp_path)
    model = model.double()
    init = _params(model)
    runs = {}
    for backend in ("fast", "reference"):
        _reset(model, init)
        t = AlignerTrainer(_config(tmp_path, backend, backend=backend, max_steps=3), model, tok, train_dataset=ROWS)
        runs[backend] = ([h["loss"] for h in t.train().history], _params(t.model))
    assert runs["fast"][0] == pytest.approx(runs["reference"][0], rel=1e-5)
    for n, p in runs["fast"][1].items():
        assert torch.allclose(p, runs["reference"][1][n], rtol=1e-5, atol=1e-7), n


@pytest.fixture
def routed_calls(monkeypatch):
    """A list that grows by one per F.linear call routed to alignfast.ops.linear, every GEMM size routed (the tiny
    corrector's are below oneDNN's size rule, cpu_gemm.min_macs_per_thread); skips where oneDNN is missing."""
    from alignfast.ops.linear import _Linear

    if not cpu_gemm.onednn_available():
        pytest.skip("oneDNN's matmul is not reachable here")
    calls = []
    original = _Linear.apply
    monkeypatch.setattr(_Linear, "apply", lambda *a: calls.append(1) or original(*a))
    with cpu_gemm.smallest_gemm(0):
        yield calls


def test_fast_backend_on_onednn_gemms_matches_aten(tmp_path, routed_calls):
    """The fast loss runs the corrector's F.linear calls through alignfast.ops.linear (ops/cpu_gemm.py's library):
    with oneDNN's GEMMs and with ATen's, the same losses and weights to float32 rounding."""
    calls = routed_calls
    model, tok = tiny_corrector(tmp_path)
    init = _params(model)
    runs = {}
    for library in ("onednn", "aten"):
        _reset(model, init)
        calls.clear()
        with cpu_gemm.use(library):
            t = AlignerTrainer(_config(tmp_path, library, max_steps=3), model, tok, train_dataset=ROWS)
            runs[library] = ([h["loss"] for h in t.train().history], _params(t.model), len(calls))
    assert runs["onednn"][2] > 0 and runs["aten"][2] == 0
    assert runs["onednn"][0] == pytest.approx(runs["aten"][0], rel=1e-5)
    for n, p in runs["onednn"][1].items():
        assert torch.allclose(p, runs["aten"][1][n], rtol=1e-4, atol=1e-6), n


def test_a_corrector_with_hugging_face_checkpointing_trains_on_the_fast_backend(tmp_path, routed_calls):
    """HF's checkpoint recomputes layers in the backward, outside the loss's routing block: the loss then keeps
    ATen's GEMMs (ops/linear.route_linear) instead of failing with torch's CheckpointError."""
    calls = routed_calls
    model, tok = tiny_corrector(tmp_path)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with cpu_gemm.use("onednn"):
        t = AlignerTrainer(_config(tmp_path, "ckpt", max_steps=2), model, tok, train_dataset=ROWS)
        history = t.train().history
    assert len(history) == 2 and all(h["loss"] > 0 for h in history)
    assert not calls


@pytest.mark.parametrize("accumulation", [1, 2])
def test_fast_backend_with_the_kept_head_gradient_is_bit_for_bit(tmp_path, monkeypatch, accumulation):
    """The LM head's dW written into one kept block (ops/weight_grad_buffer.py) trains the same corrector, bit for
    bit, as a fresh dW per micro-batch."""
    from alignfast.ops import weight_grad_buffer

    model, tok = tiny_corrector(tmp_path)
    init = _params(model)
    runs = {}
    for name, min_bytes in (("kept", 0), ("fresh", 1 << 62)):
        monkeypatch.setattr(weight_grad_buffer, "MIN_GRADIENT_BYTES", min_bytes)
        _reset(model, init)
        t = AlignerTrainer(_config(tmp_path, name, max_steps=3, gradient_accumulation_steps=accumulation), model, tok,
                           train_dataset=ROWS)
        runs[name] = ([h["loss"] for h in t.train().history], _params(t.model), t.head_grad_buffer)
        weight_grad_buffer.unregister(t.loss_fn.head.weight)
    block = runs["kept"][2]
    assert runs["fresh"][2] is None and block.lent >= 3 and block.lent + block.busy == 3 * accumulation
    assert runs["kept"][0] == runs["fresh"][0]
    for n, p in runs["kept"][1].items():
        assert torch.equal(p, runs["fresh"][1][n]), n


def test_identity_rows_are_added_to_the_training_set(tmp_path):
    model, tok = tiny_corrector(tmp_path)
    rows = ROWS * 10
    trainer = AlignerTrainer(_config(tmp_path, identity_ratio=0.25), model, tok, train_dataset=rows)
    assert trainer.data_stats == {"rows": 80, "identity_rows": 20, "truncated_rows": 0}
    assert sum(r.get("identity", False) for r in trainer.train_rows) == 20


def test_identity_rows_are_a_warm_up_first_as_the_paper_trains_or_mixed_in(tmp_path):
    """identity_ratio was called the paper's identity warm-up, but its rows were shuffled through the whole run. The
    paper first trains the identity mapping (question, answer, answer), then the corrections: identity_schedule
    'warmup' (the default) gives the identity rows the run's first steps, each row once, and the correction rows the
    rest; 'mixed' is the earlier behaviour. Without identity rows the schedule changes nothing."""
    model, tok = tiny_corrector(tmp_path)
    rows = ROWS * 10  # 60 rows; identity_ratio 0.25 adds 20 identity rows after them; 6 rows per step

    def order(schedule, **kw):
        trainer = AlignerTrainer(_config(tmp_path, identity_ratio=0.25, identity_schedule=schedule, **kw), model, tok,
                                 train_dataset=rows)
        return trainer, [[trainer.train_rows[i].get("identity", False) for i in trainer.step_rows(s)]
                         for s in range(trainer.num_steps)]

    warm, steps = order("warmup", max_steps=12)
    assert warm.identity_steps == 4 and warm.num_steps == 12  # ceil(20 / 6) warm-up steps within max_steps
    assert all(all(s) for s in steps[:4]) and not any(any(s) for s in steps[4:])
    assert {i for s in range(4) for i in warm.step_rows(s)} == set(range(60, 80))  # every identity row, first
    assert warm.step_rows(4) == batch_indices(60, 6, 0, 0)  # then the correction rows, from their own first step
    mixed, steps = order("mixed", max_steps=12)
    assert mixed.identity_steps == 0 and any(any(s) for s in steps[4:]) and not all(all(s) for s in steps[:4])
    assert [mixed.step_rows(s) for s in range(12)] == [batch_indices(80, 6, s, 0) for s in range(12)]
    # epochs count the correction rows after the warm-up: 4 + ceil(2 * 60 / 6); mixed: ceil(2 * 80 / 6)
    assert order("warmup", max_steps=-1, num_train_epochs=2)[0].num_steps == 24
    assert order("mixed", max_steps=-1, num_train_epochs=2)[0].num_steps == 27
    with pytest.raises(AlignfastArgumentError, match=r"argument 'max_steps' \(4\) leaves no step for the correction "
                       r"rows after the identity warm-up's 4 steps"):
        order("warmup", max_steps=4)
    none = AlignerTrainer(_config(tmp_path), model, tok, train_dataset=rows)  # identity_ratio 0: unchanged
    assert none.identity_steps == 0 and [none.step_rows(s) for s in range(6)] == [batch_indices(60, 6, s, 0)
                                                                                  for s in range(6)]


@pytest.mark.parametrize("schedule, stop", [("warmup", 2), ("warmup", 4), ("mixed", 3)])
def test_a_run_with_identity_rows_resumes_exactly(tmp_path, schedule, stop):
    """The warm-up's order is a pure function of (seed, step): a run stopped inside the warm-up or after it resumes
    to the uninterrupted run's weights and losses."""
    model, tok = tiny_corrector(tmp_path)
    init = _params(model)

    def run(name, **kw):
        _reset(model, init)
        return AlignerTrainer(_config(tmp_path, name, identity_ratio=0.5, identity_schedule=schedule,
                                      per_device_train_batch_size=1, save_strategy="steps", save_steps=1, **kw),
                              model, tok, train_dataset=ROWS)

    full = run("full")
    assert full.identity_steps == (3 if schedule == "warmup" else 0)  # 6 identity rows, 2 per step
    full.train()
    want = _params(full.model)

    class Stop:
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step == stop

    part = run("part")
    part.callbacks.callbacks.append(Stop())
    part.train()
    model2, _ = tiny_corrector(tmp_path / "other", seed=9)
    resumed = AlignerTrainer(_config(tmp_path, "part", identity_ratio=0.5, identity_schedule=schedule,
                                     per_device_train_batch_size=1, save_strategy="steps", save_steps=1), model2, tok,
                             train_dataset=ROWS)
    assert resumed.train(resume_from_checkpoint=True).global_step == 6
    for n, p in _params(resumed.model).items():
        assert torch.equal(p, want[n]), n
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("full", "part")]
    assert losses[0] == losses[1]


def test_a_checkpoint_from_before_identity_schedule_resumed_under_the_warm_up_says_so(tmp_path, caplog):
    """A checkpoint written before identity_schedule existed mixed its identity rows in: resumed under the (new
    default) warm-up, its order changes, which the usual changed-settings warning now says; without identity rows
    the schedule is moot and nothing is said."""
    model, tok = tiny_corrector(tmp_path)
    init = _params(model)

    def run(ratio, schedule, max_steps):
        _reset(model, init)
        return AlignerTrainer(_config(tmp_path, f"r{ratio}", identity_ratio=ratio, identity_schedule=schedule,
                                      save_strategy="steps", save_steps=2, max_steps=max_steps), model, tok,
                              train_dataset=ROWS)

    for ratio in (0.5, 0.0):
        run(ratio, "mixed", 4).train()
        _edit_checkpoint_state(tmp_path / f"r{ratio}" / "checkpoint-4",
                               lambda state: state["config"].pop("identity_schedule"))
        caplog.clear()
        with caplog.at_level("WARNING", logger="alignfast"):
            run(ratio, "warmup", 6).train(resume_from_checkpoint=True)
        assert ("settings that differ from the checkpoint's (identity_schedule)" in caplog.text) == (ratio > 0)
        caplog.clear()
        with caplog.at_level("WARNING", logger="alignfast"):
            run(ratio, "mixed", 8).train(resume_from_checkpoint=str(tmp_path / f"r{ratio}" / "checkpoint-4"))
        assert "identity_schedule" not in caplog.text


def test_weight_decay_spares_biases_and_norm_weights_as_transformers_trainer_does(tmp_path):
    """weight_decay (a TrainingArguments name) was applied to every parameter, the RMSNorm weights included;
    transformers' Trainer exempts biases and norm weights, and AlignerTrainer now builds the same two groups."""
    from transformers import Trainer

    model, tok = tiny_corrector(tmp_path)
    trainer = AlignerTrainer(_config(tmp_path, weight_decay=0.1), model, tok, train_dataset=ROWS)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    spared = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == set(Trainer.get_decay_parameter_names(None, model)) and decayed.isdisjoint(spared)
    assert decayed | spared == set(names.values())
    assert "model.norm.weight" in spared and "model.layers.0.self_attn.q_proj.weight" in decayed


def test_lora_trains_only_the_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = tiny_corrector(tmp_path)
    base = _params(model)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = AlignerTrainer(_config(tmp_path, max_steps=3), model, tok, train_dataset=ROWS, peft_config=cfg)
    assert trainer.params and all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    trainer.train()
    trainer.save_model(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    merged = Corrector.from_pretrained(tmp_path / "adapter", max_new_tokens=3)
    assert len(merged.correct(["what is the cat"], ["a dog"])) == 1
    for n, p in trainer.model.get_base_model().named_parameters():
        if "lora_" not in n and "base_layer" not in n and n in base:
            assert torch.equal(p, base[n]), n


def test_bad_arguments(tmp_path):
    model, tok = tiny_corrector(tmp_path)
    with pytest.raises(AlignfastArgumentError, match="argument 'train_dataset' row 1 has no 'correction' field"):
        AlignerTrainer(_config(tmp_path), model, tok, train_dataset=[ROWS[0], {"question": "q", "answer": "a"}])
    with pytest.raises(AlignfastArgumentError, match="argument 'tokenizer' is required"):
        AlignerTrainer(_config(tmp_path), model, None, train_dataset=ROWS)
    with pytest.raises(AlignfastArgumentError, match="argument 'upstream' must be an alignfast TargetEngine"):
        AlignerPipeline(object(), Corrector(model, tok, template=TEMPLATE))
    with pytest.raises(AlignfastArgumentError, match="argument 'aligner' .* has no aligner_config.json"):
        Corrector.from_pretrained(tmp_path / "corrector")
    trainer = AlignerTrainer(_config(tmp_path, save_strategy="steps", save_steps=1, max_steps=1), model, tok,
                             train_dataset=ROWS)
    trainer.train()
    with pytest.raises(AlignfastArgumentError, match="argument 'output_dir' .* already holds a run"):
        AlignerTrainer(_config(tmp_path, max_steps=1), model, tok, train_dataset=ROWS).train()


def test_an_hf_upstream_is_asked_in_its_own_chat_format(tmp_path):
    """AlignerPipeline(HFEngine(...), ...) sent the question as plain text unless upstream_tokenizer was given, and
    the toy chat target then answered '0 0 0 0 0 0 0 0' and '' instead of its real answers. The engine's own
    tokenizer is now the default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.rollout import HFEngine
    from alignfast.toy import load_world

    world = load_world()
    target_tok = AutoTokenizer.from_pretrained(world.target_path)
    target = AutoModelForCausalLM.from_pretrained(world.target_path).eval()
    model, tok = tiny_corrector(tmp_path, hidden=32)
    corrector = Corrector(model, tok, template=TEMPLATE)
    questions = ["sort 4 8 5 1", "max 1 3 4 2 6"]
    implicit = AlignerPipeline(HFEngine(target, target_tok), corrector, upstream_max_new_tokens=8).answer(questions)
    explicit = AlignerPipeline(HFEngine(target, target_tok), corrector, upstream_tokenizer=target_tok,
                               upstream_max_new_tokens=8).answer(questions)
    assert implicit == explicit == ["8 5 4 1", "1"]  # the toy target's (mis)readings, as `alignfast correct` gets


def _toy_target():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignfast.rollout import HFEngine
    from alignfast.toy import load_world

    world = load_world()
    return HFEngine(AutoModelForCausalLM.from_pretrained(world.target_path).eval(),
                    AutoTokenizer.from_pretrained(world.target_path))


def test_the_pipeline_says_which_upstream_answers_were_cut(tmp_path):
    """AlignerPipeline kept only the upstream's text: an answer cut at upstream_max_new_tokens was corrected as if
    whole. Each Correction now says so (answer_truncated), and None where the answers were given, not generated."""
    model, tok = tiny_corrector(tmp_path, hidden=32)
    questions = ["sort 4 8 5 1", "max 1 3 4 2 6"]  # the toy target answers '8 5 4 1' and '1'
    pipe = AlignerPipeline(_toy_target(), Corrector(model, tok, template=TEMPLATE, max_new_tokens=2),
                           upstream_max_new_tokens=2)
    got = pipe(questions)
    assert [(g.answer, g.answer_truncated) for g in got] == [("8 5", True), ("1", False)]
    assert [c.finish_reason for c in pipe.upstream_completions(questions)] == ["length", "stop"]
    assert [g.answer_truncated for g in pipe(questions, answers=["a", "b"])] == [None, None]


def test_the_pipeline_takes_the_correctors_budget_and_names_it(tmp_path):
    """AlignerPipeline had no max_new_tokens: a corrector loaded from a folder got 256, and one of 64 positions failed
    at the first correction naming an argument ('max_new_tokens') the caller could not pass. It is now the pipeline's
    setting (with dtype, as `alignfast correct` has them), checked when the pipeline is built."""
    from alignfast.aligner.pipeline import Corrector as _Corrector

    model, tok = tiny_corrector(tmp_path, hidden=32)
    model.config.max_position_embeddings = 64
    trainer = AlignerTrainer(_config(tmp_path, max_steps=1), model, tok, train_dataset=ROWS)
    folder = trainer.save_model(tmp_path / "final")
    with pytest.raises(AlignfastArgumentError, match=r"^alignfast: argument 'max_new_tokens' \(256, the default\) "
                       r"leaves no room for the corrector's input: its max_position_embeddings is 64$"):
        AlignerPipeline(_toy_target(), folder, upstream_max_new_tokens=8)
    with pytest.raises(AlignfastArgumentError, match=r"argument 'upstream_max_new_tokens' \(64\) leaves no room"):
        AlignerPipeline(_toy_target(), folder, upstream_max_new_tokens=64, max_new_tokens=8)
    pipe = AlignerPipeline(_toy_target(), folder, upstream_max_new_tokens=8, max_new_tokens=3, dtype=torch.float64)
    assert pipe.corrector.max_new_tokens == 3 and next(pipe.corrector.model.parameters()).dtype == torch.float64
    got = pipe(["sort 4 8 5 1"])
    assert got[0].answer == "8 5 4 1" and got[0].answer_truncated is False
    for name, value in (("max_new_tokens", 3), ("dtype", torch.float64)):
        with pytest.raises(AlignfastArgumentError, match=f"argument '{name}' is a setting of the corrector loaded"):
            AlignerPipeline(_toy_target(), _Corrector.from_pretrained(folder), upstream_max_new_tokens=8,
                            **{name: value})


def test_a_vllm_upstream_is_asked_in_its_own_chat_format(tmp_path, monkeypatch):
    """Only an HFEngine's tokenizer was the default: a VLLMEngine upstream got the raw question, without its chat
    template. vLLM's own tokenizer (LLM.get_tokenizer()) is now the default too. vllm is stubbed: the engine code
    is alignfast's, the stub records what LLM.generate receives."""
    import sys
    import types

    from transformers import AutoTokenizer

    from alignfast.rollout.vllm_engine import VLLMEngine
    from tests.trainer.tiny import make_tokenizer

    seen = []

    class LLM:
        def __init__(self, **kw):
            self.tokenizer = AutoTokenizer.from_pretrained(kw["tokenizer"])

        def get_tokenizer(self):
            return self.tokenizer

        def generate(self, inputs, params, use_tqdm=False):
            seen.extend(inputs)
            out = types.SimpleNamespace(text="a dog", token_ids=[1], finish_reason="stop", index=0)
            return [types.SimpleNamespace(outputs=[out]) for _ in inputs]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw))
    model, tok = tiny_corrector(tmp_path)
    chat_tok = make_tokenizer(tmp_path / "chat_tok", ["what", "is", "the", "cat"], chat_template=True)
    upstream = VLLMEngine(str(tmp_path / "upstream-model"), tokenizer=str(tmp_path / "chat_tok"))
    pipe = AlignerPipeline(upstream, Corrector(model, tok, template=TEMPLATE, max_new_tokens=2))
    assert pipe.answer(["what is the cat"]) == ["a dog"]
    assert seen == [{"prompt_token_ids": chat_tok.apply_chat_template(
        [{"role": "user", "content": "what is the cat"}], add_generation_prompt=True, tokenize=True,
        return_dict=False)}]
    # The PPO trainers' target engine takes the same default (TargetEngine.chat_tokenizer): a VLLMEngine target got
    # its requests as bare text, and a target_system_prompt was lost with them.
    from alignfast.trainer.align_pro import make_target_engine

    assert make_target_engine(upstream, None)[1] is upstream.llm.tokenizer


def _edit_checkpoint_state(checkpoint, edit) -> None:
    """trainer_state.json changed by edit(state), the manifest rewritten to match (as an older alignfast wrote it)."""
    from alignfast.trainer import checkpoint as ckpt

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    edit(state)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    (checkpoint / "manifest.json").unlink()
    ckpt._write_manifest(checkpoint)


def test_a_checkpoint_from_before_the_one_text_encoding_resumes_on_its_own_encoding(tmp_path, caplog):
    """A checkpoint written before the encoding was recorded resumed on the one-text encoding: the rows' ids changed
    midway through the run, and the saved corrector, fed one-text ids, had been trained on both. Such a checkpoint
    (no encoding_version) now goes on with the pieces-apart encoding, says so, and the corrector records it."""
    from alignfast.aligner.data import ONE_TEXT, PIECES_APART, CorrectionEncoder
    from alignfast.trainer.resume_checks import CheckpointMismatchError
    from tests.trainer.tiny import make_causal_lm

    tok = bpe_tokenizer(tmp_path / "bpe")
    rows = [{"question": "What is the capital of France?", "answer": a, "correction": "The capital of France is Paris."}
            for a in ("Paris is the capital.", "France is Paris.", "The capital is France.")]

    def run(max_steps):
        model = make_causal_lm(tmp_path / f"m{max_steps}", len(tok), hidden=16, layers=1)
        return AlignerTrainer(_config(tmp_path, "run", template="repo", save_strategy="steps", save_steps=2,
                                      max_steps=max_steps, per_device_train_batch_size=1), model, tok,
                              train_dataset=rows)

    run(2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["encoding_version"] == ONE_TEXT
    assert json.loads((checkpoint / "policy" / "aligner_config.json").read_text())["encoding_version"] == ONE_TEXT
    _edit_checkpoint_state(checkpoint, lambda state: state.pop("encoding_version"))

    resumed = run(4)
    with caplog.at_level("WARNING", logger="alignfast.aligner"):
        assert resumed.train(resume_from_checkpoint=True).global_step == 4
    assert "tokenized its rows by encoding_version 1 (the pieces apart" in caplog.text
    apart = CorrectionEncoder(tok, resumed.config.template_text, max_length=resumed.config.max_length,
                              encoding_version=PIECES_APART)
    assert resumed.train_encoded == [apart.encode(r) for r in rows] != run(4).train_encoded
    assert resumed.corrector().encoder.encoding_version == PIECES_APART
    saved = json.loads((resumed.save_model(tmp_path / "final") / "aligner_config.json").read_text())
    assert saved["encoding_version"] == PIECES_APART

    _edit_checkpoint_state(checkpoint, lambda state: state.update(encoding_version=3))
    with pytest.raises(CheckpointMismatchError, match="by encoding_version 3, which this alignfast does not know"):
        run(4).train(resume_from_checkpoint=str(checkpoint))


def test_a_resume_across_other_weight_decay_groups_carries_the_optimizer_state(tmp_path, caplog):
    """The optimizer's parameter groups differ when weight decay is switched on or off (biases and norm weights get
    a weight_decay-0 group of their own), or when the checkpoint is from the alignfast that decayed every weight (one
    group): torch refused such a state. The same parameters in the same order, it is fitted to this run's groups
    (as the PPO trainers do), and a changed weight_decay is the usual warning about changed settings."""
    model, tok = tiny_corrector(tmp_path / "m")
    init = _params(model)

    def run(name, weight_decay, max_steps):
        _reset(model, init)
        return AlignerTrainer(_config(tmp_path, name, save_strategy="steps", save_steps=2, max_steps=max_steps,
                                      weight_decay=weight_decay), model, tok, train_dataset=ROWS)

    for name, (before, after) in (("on", (0.0, 0.1)), ("off", (0.1, 0.0))):
        run(name, before, 2).train()
        saved = torch.load(tmp_path / name / "checkpoint-2" / "optimizer.pt")["state"]
        resumed = run(name, after, 4)
        resumed._load_checkpoint(tmp_path / name / "checkpoint-2")
        for k, p in enumerate(resumed.params):
            assert torch.equal(resumed.optimizer.state[p]["exp_avg"], saved[k]["exp_avg"])
        assert "weight_decay" in caplog.text
        assert resumed.train(resume_from_checkpoint=True).global_step == 4

    # as the alignfast that decayed every weight wrote it: one group holding every parameter
    checkpoint = tmp_path / "off" / "checkpoint-2"
    optimizer = torch.load(checkpoint / "optimizer.pt")
    groups = optimizer["param_groups"]
    optimizer["param_groups"] = [{**groups[0], "params": [i for g in groups for i in g["params"]]}]
    torch.save(optimizer, checkpoint / "optimizer.pt")
    _edit_checkpoint_state(checkpoint, lambda state: None)
    assert run("off", 0.1, 4).train(resume_from_checkpoint=True).global_step == 4


def test_max_length_beyond_the_correctors_context_becomes_the_context(tmp_path, caplog):
    """max_length is a cap (default 2048): a corrector with 256 positions trains with rows cut to 256 tokens, said
    once, instead of feeding longer rows past its positions (or refusing the default)."""
    import logging

    model, tok = tiny_corrector(tmp_path)
    positions = model.config.max_position_embeddings
    with caplog.at_level(logging.WARNING, logger="alignfast"):
        trainer = AlignerTrainer(_config(tmp_path, max_length=positions + 100), model, tok, train_dataset=ROWS)
    assert trainer.config.max_length == positions
    assert f"max_length={positions + 100} is beyond the corrector's max_position_embeddings ({positions})" \
        in caplog.text


def test_the_toy_targets_tokenizer_with_another_corrector_is_a_warning(tmp_path, caplog):
    """`--aligner.tokenizer toy:target` (51 tokens, EOS 3 and BOS 2) with a 220-row corrector (EOS 2, BOS 1) trained
    and exited 0 with no word: only a tokenizer larger than the embeddings was refused. It is now a warning naming
    the setting; the corrector's own tokenizer gives none."""
    from transformers import AutoTokenizer

    from alignfast.toy import load_world
    from tests.trainer.tiny import make_causal_lm

    toy = AutoTokenizer.from_pretrained(load_world().target_path)
    model = make_causal_lm(tmp_path / "m", 220, hidden=16, layers=1)
    rows = [{"question": "sort 4 8 5 1", "answer": "8 5 4 1", "correction": "1 4 5 8"}]
    with caplog.at_level("WARNING", logger="alignfast"):
        AlignerTrainer(_config(tmp_path, template="{question} : {answer}"), model, toy, train_dataset=rows)
    message = next(r.getMessage() for r in caplog.records if "another model's tokenizer" in r.getMessage())
    assert "its eos token id is 3, the model config's 2" in message and "51 tokens for the corrector's 220" in message
    assert "(aligner.tokenizer in a run file)" in message
    caplog.clear()
    own, tok = tiny_corrector(tmp_path / "own")
    with caplog.at_level("WARNING", logger="alignfast"):
        AlignerTrainer(_config(tmp_path, "o2"), own, tok, train_dataset=ROWS)
    assert "another model's tokenizer" not in caplog.text


def test_a_resume_over_more_steps_runs_its_first_step_at_the_rebuilt_learning_rate(tmp_path):
    """As for the PPO trainers (trainer/resume_checks.follow_schedule): extending a finished 3-step run (linear decay)
    to 6 steps ran step 4 at the old schedule's last rate; it now runs at lr0 * (1 - 3/6)."""
    model, tok = tiny_corrector(tmp_path)
    cfg = dict(lr_scheduler_type="linear", save_strategy="steps", save_steps=3)
    AlignerTrainer(_config(tmp_path, max_steps=3, **cfg), model, tok, train_dataset=ROWS).train()
    AlignerTrainer(_config(tmp_path, max_steps=6, **cfg), model, tok, train_dataset=ROWS).train(
        resume_from_checkpoint=True)
    lrs = [json.loads(x)["learning_rate"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    want = [1e-2 * (1 - k / 3) for k in range(3)] + [1e-2 * (1 - k / 6) for k in range(3, 6)]
    assert lrs == pytest.approx(want, rel=1e-12), lrs
