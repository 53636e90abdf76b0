"""Resume: a run stopped after step k and resumed from its checkpoint ends with exactly the parameters
(policy and critic), metrics and RNG-dependent choices of an uninterrupted run."""

import json

import torch

from tests.trainer.tiny import echo_trainer, small_world

STEPS, STOP_AT = 4, 2


def make(tok, prompter_dir, out, **overrides):
    cfg = dict(output_dir=str(out), seed=11, per_device_train_batch_size=3, num_mini_batches=2, num_ppo_epochs=2,
               max_steps=STEPS, response_length=4, temperature=1.0, learning_rate=5e-3, save_steps=STOP_AT,
               logging_steps=1, rewrite_template="{prompt}", adap_kl_ctrl=True, kl_target=0.5, kl_horizon=20)
    cfg.update(overrides)
    return echo_trainer(tok, prompter_dir, **cfg)


def state(trainer):
    out = {f"policy.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    out.update({f"value.{n}": p.detach().clone() for n, p in trainer.value_model.named_parameters()})
    return out


def test_resume_matches_uninterrupted_run(tmp_path):
    tok, prompter_dir = small_world(tmp_path)
    full, _ = make(tok, prompter_dir, tmp_path / "full")
    full_out = full.train()

    first, rec = make(tok, prompter_dir, tmp_path / "split")
    rec.stop_at = STOP_AT
    first.train()
    assert first.global_step == STOP_AT
    assert (tmp_path / "split" / f"checkpoint-{STOP_AT}" / "trainer_state.json").exists()

    # A fresh process would rebuild everything from the same inputs and resume.
    second, _ = make(tok, prompter_dir, tmp_path / "split")
    second_out = second.train(resume_from_checkpoint=True)
    assert second_out.global_step == STEPS

    a, b = state(full), state(second)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    assert full.kl_ctl.value == second.kl_ctl.value  # adaptive controller state carried over
    keys = ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "lr", "episode")
    assert [{k: m[k] for k in keys} for m in full_out.history] == [{k: m[k] for k in keys} for m in second_out.history]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
    full_samples = (tmp_path / "full" / "samples.jsonl").read_text()
    assert (tmp_path / "split" / "samples.jsonl").read_text() == full_samples


def test_resume_drops_samples_written_past_the_checkpoint(tmp_path):
    """A run that died after its last checkpoint logged samples of steps that the resumed run repeats: they
    are dropped, so samples.jsonl holds each step once, as after an uninterrupted run."""
    tok, prompter_dir = small_world(tmp_path)
    full, _ = make(tok, prompter_dir, tmp_path / "full", max_steps=3, save_steps=1)
    full.train()
    crashed, _ = make(tok, prompter_dir, tmp_path / "crashed", max_steps=3, save_steps=1)
    crashed.train()
    # As if the process had died after logging step 3 but before writing checkpoint-3.
    import shutil

    shutil.rmtree(tmp_path / "crashed" / "checkpoint-3")
    resumed, _ = make(tok, prompter_dir, tmp_path / "crashed", max_steps=3, save_steps=1)
    resumed.train(resume_from_checkpoint=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "samples.jsonl").read_text().splitlines()]
    want = [json.loads(line)["step"] for line in (tmp_path / "full" / "samples.jsonl").read_text().splitlines()]
    assert steps == want and steps.count(3) == steps.count(1) > 0


def test_fresh_run_refuses_an_output_dir_holding_a_run(tmp_path):
    """Starting over in a used output_dir (without resume) would overwrite metrics.jsonl, let `resume` pick the
    old run's later checkpoints and let save_total_limit delete the new run's: an error naming output_dir, or a
    clean slate with overwrite_output_dir."""
    import pytest

    from alignfast.ops._checks import AlignfastArgumentError
    from alignfast.trainer import checkpoint as ckpt

    tok, prompter_dir = small_world(tmp_path)
    out = tmp_path / "run"
    old, _ = make(tok, prompter_dir, out, max_steps=3, save_steps=1)
    old.train()
    before = (out / "metrics.jsonl").read_text()
    again, _ = make(tok, prompter_dir, out, max_steps=1, save_steps=1)
    with pytest.raises(AlignfastArgumentError, match="'output_dir' .*already holds a run .*checkpoint-1.*resume"):
        again.train()
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    # The old run's final model and the reports eval wrote beside it go too (a LoRA adapter left in final/ was
    # loaded instead of the new run's weights); another arm's run in a subfolder stays.
    old.save_model(out / "final")
    (out / "final" / "adapter_config.json").write_text("{}")
    (out / "eval.json").write_text("{}")
    (out / "oracle").mkdir()
    (out / "oracle" / "metrics.jsonl").write_text("{}\n")
    fresh, _ = make(tok, prompter_dir, out, max_steps=1, save_steps=1, save_total_limit=1, overwrite_output_dir=True)
    fresh.train()
    assert not (out / "final").exists() and not (out / "eval.json").exists()
    assert (out / "oracle" / "metrics.jsonl").read_text() == "{}\n"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert ckpt.load_checkpoint(out / "checkpoint-1")["state"]["num_steps"] == 1  # the new run's, not the old one's

    # An evaluation in the parent folder that took one of this run's checkpoints as a second arm goes with the run
    # (recorded absolute, or relative to the working folder by an older alignfast); one of other runs stays.
    (tmp_path / "eval.json").write_text(json.dumps({"checkpoint": str(tmp_path / "other" / "final"),
                                                    "oracle_checkpoint": str(out / "final")}))
    (tmp_path / "eval.md").write_text("| table |\n")
    (tmp_path / "other_eval").mkdir()
    (tmp_path / "other_eval" / "eval.json").write_text(json.dumps({"checkpoint": str(tmp_path / "other")}))
    again, _ = make(tok, prompter_dir, out, max_steps=1, save_steps=1, overwrite_output_dir=True)
    again.train()
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "eval.md").exists()
    assert (tmp_path / "other_eval" / "eval.json").exists()


def test_reports_describing_a_run_reads_eval_json_of_the_parent(tmp_path, monkeypatch):
    from alignfast.eval.report_files import reports_describing

    run = tmp_path / "run"
    (run / "oracle").mkdir(parents=True)
    assert reports_describing(run / "oracle") == []
    (run / "eval.json").write_text(json.dumps({"checkpoint": "run/final", "oracle_checkpoint": "run/oracle/final"}))
    monkeypatch.chdir(tmp_path)  # an older alignfast recorded the paths as typed, relative to eval's folder
    assert reports_describing(run / "oracle") == [run / "eval.json"]
    assert reports_describing(tmp_path / "elsewhere") == []
    (run / "eval.json").write_text("not json")
    assert reports_describing(run / "oracle") == []


def test_resume_from_explicit_checkpoint_path_and_missing_one(tmp_path):
    from alignfast.trainer.checkpoint import list_checkpoints as ckpt_list

    tok, prompter_dir = small_world(tmp_path)
    trainer, _ = make(tok, prompter_dir, tmp_path / "run", max_steps=2, save_steps=1)
    trainer.train()
    # From an earlier checkpoint: the later ones belong to the branch it leaves, which a plain --resume would have
    # continued; they are moved aside (kept), and this run writes its own checkpoint-2.
    old_state = (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text()
    again, _ = make(tok, prompter_dir, tmp_path / "run", max_steps=2, save_steps=1)
    out = again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert out.global_step == 2
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), n
    aside = list((tmp_path / "run").glob("abandoned-after-checkpoint-1-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoint-2" / "trainer_state.json").read_text() == old_state
    assert [p.name for p in ckpt_list(tmp_path / "run")] == ["checkpoint-1", "checkpoint-2"]
    # A resume that fails moves nothing: a checkpoint that does not exist, or a damaged one.
    import pytest

    with pytest.raises(FileNotFoundError):
        make(tok, prompter_dir, tmp_path / "run", max_steps=2)[0].train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-0"))
    with (tmp_path / "run" / "checkpoint-1" / "trainer_state.json").open("a") as f:
        f.write(" ")  # no longer what its manifest lists
    with pytest.raises(Exception, match="checkpoint-1"):
        make(tok, prompter_dir, tmp_path / "run", max_steps=2)[0].train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert [p.name for p in ckpt_list(tmp_path / "run")] == ["checkpoint-1", "checkpoint-2"]
    assert len(list((tmp_path / "run").glob("abandoned-after-*"))) == 1
    fresh, _ = make(tok, prompter_dir, tmp_path / "empty")
    try:
        fresh.train(resume_from_checkpoint=True)
    except FileNotFoundError as err:
        assert "no checkpoint" in str(err)
    else:
        raise AssertionError("resuming with no checkpoint must fail")


def test_resume_with_changed_settings_warns(tmp_path, caplog):
    tok, prompter_dir = small_world(tmp_path)
    first, _ = make(tok, prompter_dir, tmp_path / "run", max_steps=1, save_steps=1)
    first.train()
    same, _ = make(tok, prompter_dir, tmp_path / "run", max_steps=2, save_steps=1)  # a longer run: fine
    with caplog.at_level("WARNING", logger="alignfast.trainer"):
        same.train(resume_from_checkpoint=True)
    assert not [r for r in caplog.records if "settings that differ" in r.getMessage()]
    # ... but its LR schedule is rebuilt over the new number of steps, and that is said.
    assert [r for r in caplog.records if "learning-rate schedule is rebuilt over 2 steps" in r.getMessage()]
    other, _ = make(tok, prompter_dir, tmp_path / "run", max_steps=3, save_steps=1, learning_rate=1e-3, seed=5,
                    adap_kl_ctrl=False, kl_coef=0.3)
    with caplog.at_level("WARNING", logger="alignfast.trainer"):
        other.train(resume_from_checkpoint=True)
    msgs = [r.getMessage() for r in caplog.records if "settings that differ" in r.getMessage()]
    assert len(msgs) == 1 and "learning_rate: 0.005 -> 0.001" in msgs[0] and "seed: 11 -> 5" in msgs[0], msgs
    assert "kl_coef: 0.05 -> 0.3" in msgs[0] and other.kl_ctl.value == 0.3  # a fixed kl_coef is what the config says


def test_a_checkpoint_from_before_the_weight_decay_groups_resumes(tmp_path, monkeypatch):
    """With weight_decay set, biases and norm weights now have their own weight_decay-0 param groups; a checkpoint
    written before (all in one group) was refused by torch ("different number of parameter groups", a traceback).
    Its AdamW state now carries over into the new groups, parameter by parameter."""
    import alignfast.trainer.base as base

    tok, prompter_dir = small_world(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(base, "no_weight_decay", lambda modules: set())  # the optimizer as it was built before
        first, rec = make(tok, prompter_dir, tmp_path / "old", weight_decay=0.1)
        rec.stop_at = STOP_AT
        first.train()
    saved = [first.optimizer.state[p]["exp_avg"].clone() for p in first.params]
    second, _ = make(tok, prompter_dir, tmp_path / "old", weight_decay=0.1)
    assert len(second.optimizer.param_groups) > len(first.optimizer.param_groups)
    real_train_step, checked = second._train_step, []

    def check_then_step(*args, **kwargs):  # the optimizer as the resume left it, before its first new step
        if not checked:
            for p, old in zip(second.params, saved, strict=True):
                torch.testing.assert_close(second.optimizer.state[p]["exp_avg"], old, rtol=0, atol=0)
            checked.append(True)
        return real_train_step(*args, **kwargs)

    second._train_step = check_then_step
    assert second.train(resume_from_checkpoint=True).global_step == STEPS and checked
    exempt = {id(p) for p in second.params if id(p) in second.no_decay}
    assert exempt and all(g["weight_decay"] == (0.0 if id(g["params"][0]) in exempt else 0.1)
                          for g in second.optimizer.param_groups)
