"""The trainer under 2 processes (torchrun, gloo on CPU) against 1 process: same parameters (<= 1e-5) and
metrics for Align-Pro, the Oracle arm and Proxy-RLHF, torchao's 8-bit AdamW under 2 processes, the Aligner's SFT (and its
exact resume under 2 processes), a killed 2-process run resumed (under 2 and under 1 process),
one shared OpenAI-compatible target server equal to per-process HF targets, and the bad-input error.

Two launches of 2 processes (~20-40 s each on 2 cores) share the work: tests/distributed/toy_run.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("openai")

from tests.distributed import toy_run  # noqa: E402
from tests.aligner.helpers import tiny_corrector  # noqa: E402
from tests.distributed.openai_stub import HFCompletionsStub  # noqa: E402
from tests.trainer.tiny import make_causal_lm, small_world  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "distributed" / "toy_run.py"
LAUNCH_TIMEOUT_S = 300


def launch(world: Path, out: Path, *scenarios: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           str(world), str(out), *scenarios]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    world = root / "world"
    tok, _ = small_world(world)
    make_causal_lm(world / "prompter_wide", len(tok), hidden=64)  # projections of 4096+ elements: quantised
    tiny_corrector(world / "aligner")
    one, two = root / "one", root / "two"
    stub = HFCompletionsStub(str(world / "prompter"))
    try:
        first = launch(world, two, "align_pro", "align_pro_8bit", "oracle", "hf_target", "openai_target",
                       "bad_accumulation", "bad_env_one_rank", "stopped_sharded", "fsdp_generation", "proxy", "aligner", "aligner_stopped",
                       "aligner_bad_accumulation", "killed", env={"ALIGNFAST_TEST_STUB_URL": stub.base_url})
    finally:
        stub.close()
    assert (two / "killed" / "checkpoint-2").is_dir(), first.stdout[-3000:] + first.stderr[-6000:]
    assert first.returncode != 0  # the processes died after checkpoint-2
    assert not (two / "killed" / "checkpoint-3").exists()
    shutil.copytree(two / "killed", two / "killed_copy")
    shutil.copytree(two / "stopped_sharded", two / "sharded_copy")
    shutil.copytree(two / "killed", two / "killed_probe")
    second = launch(world, two, "resume_fails_one_rank", "resume_differs_one_rank", "resumed", "resumed_sharded",
                    "aligner_resumed")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-6000:]
    toy_run.main([str(world), str(one), "align_pro", "align_pro_8bit", "oracle", "hf_target", "aligner", "proxy"])
    toy_run.main([str(world), str(two), "resumed_copy", "resumed_sharded_copy"])  # 2 processes' checkpoints, 1 resumes
    return {"world": world, "one": one, "two": two, "stub_max_in_flight": stub.max_in_flight, "stub_requests": stub.requests}


def load(folder: Path, scenario: str) -> dict:
    path = folder / f"{scenario}.pt"
    assert path.exists(), f"{scenario} wrote no result"
    return torch.load(path)


def assert_same_run(a: dict, b: dict, *, atol: float = 1e-5, rel: float = 1e-5) -> None:
    assert a["params"].keys() == b["params"].keys()
    worst = max((a["params"][k] - b["params"][k]).abs().max().item() for k in a["params"])
    assert worst <= atol, f"parameters differ by {worst}"
    assert len(a["history"]) == len(b["history"]) == toy_run.STEPS
    for step, (ma, mb) in enumerate(zip(a["history"], b["history"]), 1):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert mb[k] == pytest.approx(ma[k], rel=rel, abs=1e-6), f"step {step}: metric {k}"
    assert a["kl_coef"] == pytest.approx(b["kl_coef"], rel=1e-9)


@pytest.mark.parametrize("scenario", ["align_pro", "oracle", "hf_target"])
def test_two_processes_match_one(runs, scenario):
    two = load(runs["two"], scenario)
    assert two["num_processes"] == 2
    assert_same_run(load(runs["one"], scenario), two)


def test_eight_bit_adamw_under_two_processes(runs):
    """torchao's AdamW8bit under DDP: every process steps its own quantised copy of m and v from the same
    all-reduced gradients, so the replicas stay bitwise identical; against one process the gradients differ
    by the all-reduce's rounding, and a block's 8-bit code can flip on it (one code step of m or v moves an
    update by a few % of lr = 5e-3), so the bar is a tenth of lr, against >= 0.02 that every tensor moved."""
    pytest.importorskip("torchao")
    one, two = load(runs["one"], "align_pro_8bit"), load(runs["two"], "align_pro_8bit")
    assert two["num_processes"] == 2 and two["replicas_differ_by"] == 0.0
    assert one["quantised_states"] == two["quantised_states"] > 0  # m and v of the wide projections, 8-bit
    assert load(runs["two"], "align_pro")["quantised_states"] == 0  # exact AdamW: plain float32 state
    initial = {f"policy.{n}": p for n, p in
               AutoModelForCausalLM.from_pretrained(str(runs["world"] / "prompter_wide")).named_parameters()}
    assert min((one["params"][k] - p).abs().max().item() for k, p in initial.items()) >= 0.02
    assert_same_run(one, two, atol=5e-4, rel=1e-3)


def test_proxy_rlhf_under_two_processes_matches_one(runs):
    """Each process decodes its half of the batch with the draws those rows get in one process (keyed by row),
    the decisions are gathered right-padded, and the PPO update splits the micro-batches as for Align-Pro."""
    one, two = load(runs["one"], "proxy"), load(runs["two"], "proxy")
    assert two["num_processes"] == 2 and two["replicas_differ_by"] == 0.0
    assert all(m["proxy/rejections_per_token"] > 0 for m in one["history"])  # the proxy did reject
    assert_same_run(one, two)


def test_aligner_sft_under_two_processes_matches_one_and_resumes_exactly(runs):
    """Each process runs half of every step's micro-batches (losses scaled by N, DDP averages): the corrector's
    parameters and every metric (loss, grad_norm, eval/loss) are one process's; the main process alone writes
    checkpoints and the final corrector; a run stopped after checkpoint-2 resumes to the uninterrupted result."""
    one, two = load(runs["one"], "aligner"), load(runs["two"], "aligner")
    assert two["num_processes"] == 2 and two["replicas_differ_by"] == 0.0
    initial = {n: p for n, p in
               AutoModelForCausalLM.from_pretrained(str(runs["world"] / "aligner" / "corrector")).named_parameters()}
    assert min((one["params"][k] - p).abs().max().item() for k, p in initial.items()) >= 1e-3  # it trained
    assert max((one["params"][k] - two["params"][k]).abs().max().item() for k in one["params"]) <= 1e-5
    assert len(one["history"]) == len(two["history"]) == toy_run.STEPS and "eval/loss" in two["history"][-1]
    for ma, mb in zip(one["history"], two["history"]):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-6), k
    assert all(torch.equal(v, two["params"][k]) for k, v in two["saved"].items())
    resumed = load(runs["two"], "aligner_resumed")
    assert all(torch.equal(resumed["params"][k], two["params"][k]) for k in two["params"])
    assert resumed["history"] == two["history"]
    assert resumed["checkpoints"] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    message = (runs["two"] / "aligner_bad_accumulation.error").read_text()
    assert "\n" not in message and "'gradient_accumulation_steps'" in message and "6 rows" in message


def test_shared_openai_target_matches_per_process_hf_targets(runs):
    assert_same_run(load(runs["two"], "hf_target"), load(runs["two"], "openai_target"))
    # 2 processes x max_concurrency 2: never more than 4 requests in flight at the server
    assert runs["stub_requests"] > 0 and 1 <= runs["stub_max_in_flight"] <= 4


def test_killed_two_process_run_resumes_to_the_uninterrupted_result(runs):
    uninterrupted = load(runs["two"], "align_pro")
    assert_same_run(uninterrupted, load(runs["two"], "resumed"), atol=0.0)
    # resumed by one process: the state is replicated and the run does not depend on the process count
    assert_same_run(uninterrupted, load(runs["two"], "resumed_copy"))
    assert (runs["two"] / "killed" / "checkpoint-3").is_dir()
    lines = (runs["two"] / "killed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == toy_run.STEPS  # written once per step, by the main process only


def test_batch_that_does_not_split_over_the_processes_is_one_line_error(runs):
    message = (runs["two"] / "bad_accumulation.error").read_text()
    assert "\n" not in message and "'gradient_accumulation_steps'" in message and "processes (2)" in message


def test_a_resume_one_process_sees_otherwise_ends_every_process(runs):
    """Each process verifies the checkpoints itself: one that finds none whole failed alone, and one that read the
    newest as damaged resumed an earlier step alone. Both now end every process with one line (the launch went
    on to the next scenarios, so none waited in a collective)."""
    failed = (runs["two"] / "resume_fails_one_rank.error").read_text()
    assert "\n" not in failed and "failed on another process: CorruptCheckpointError" in failed, failed
    differ = (runs["two"] / "resume_differs_one_rank.error").read_text()
    assert "\n" not in differ and "chose different checkpoints to resume from (steps 1 to 2" in differ, differ


def test_an_environment_output_one_process_rejects_ends_every_process(runs):
    """A None score on one process's share of the batch: that process's check raised alone, and the other waited in
    the gather of the environment's outputs; every process now raises the same one line (the launch returned)."""
    message = (runs["two"] / "bad_env_one_rank.error").read_text()
    assert "\n" not in message and ".step returned no score (None) for episode " in message, message


def test_sharded_state_checkpoint_resumes_under_the_same_processes_only(runs):
    """accelerate's save_state/load_state path (FSDP2/ZeRO-3's), taken under DDP on CPU: the shards live in
    the checkpoint, the gathered policy is saved beside them, the resumed run is the uninterrupted one."""
    checkpoint = runs["two"] / "stopped_sharded" / "checkpoint-2"
    assert (checkpoint / "sharded").is_dir() and (checkpoint / "policy" / "config.json").exists()
    assert not list((runs["two"] / "stopped_sharded").glob(".tmp-*"))
    resumed = load(runs["two"], "resumed_sharded")
    assert_same_run(load(runs["two"], "align_pro"), resumed, atol=0.0)
    assert resumed["saved"] and all(torch.equal(v, resumed["params"][k]) for k, v in resumed["saved"].items())
    message = (runs["two"] / "resumed_sharded_copy.error").read_text()
    assert "\n" not in message and "'num_processes'" in message and "sharded over 2 processes" in message


def test_oracle_generation_from_an_fsdp2_sharded_policy(runs):
    res = torch.load(runs["two"] / "fsdp_generation.pt")
    assert torch.equal(res["expected"], res["got"])
    assert res["logprob_diff"] <= 1e-5
    assert res["unsharded_call_failed"]  # without gathered_for_generation the sharded root's weights are missing


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(runs, tmp_path):
    """Slurm signalling one node, or a kill of one worker: the signalled process used to wait in its checkpoint's
    barrier while the other went on into the next step's gathers, a deadlock with no checkpoint. The processes
    now agree on the stop once per step (run_loop: Processes.max_int of the signal)."""
    proc = launch(runs["world"], tmp_path, "signal_one_rank", "signal_during_save", "callback_one_rank")
    assert (tmp_path / "signal_one_rank.stopped").read_text().split()[:2] == ["1", "SIGTERM"], \
        proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "signal_one_rank" / "checkpoint-1").is_dir()
    assert not (tmp_path / "signal_one_rank" / "checkpoint-2").exists()
    # Signalled after the agreement (during checkpoint-1's save): the next step's agreement carries it.
    assert (tmp_path / "signal_during_save.stopped").read_text().split()[:2] == ["2", "SIGTERM"], \
        proc.stdout[-3000:] + proc.stderr[-6000:]
    assert not (tmp_path / "signal_during_save" / "checkpoint-3").exists()
    # A callback's stop request on one process (before 2026-12-01 that process alone stopped, and both hung in
    # checkpoint-1's barrier): the processes agree on it as on a signal, and both end the run after step 1.
    callback = torch.load(tmp_path / "callback_one_rank.pt", weights_only=False)
    assert [m["step"] for m in callback["history"]] == [1] and callback["replicas_differ_by"] == 0.0
    assert (tmp_path / "callback_one_rank" / "checkpoint-1").is_dir()
