"""``--irl-loss online`` and ``gail``: the policy rows, the configuration checks, and real
torchrun launches of ``megatron_irl.train`` on the tiny configuration (``helpers.run_train``),
two of them at PP=2, whose losses are also pinned as golden curves."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_irl.config import ConfigError, IRLConfig, ParallelConfig, TrainConfig
from megatron_irl.config_online import OnlineConfig
from helpers import assert_golden_losses, assert_same_losses, losses, run_train

SAMPLING = ["--online-max-new-tokens", "16", "--online-sample-interval", "2"]
ONLINE = ["--irl-loss", "online", *SAMPLING]
GAIL = ["--irl-loss", "gail", *SAMPLING, "--gail-entropy-weight", "0.01", "--gail-kl-weight",
        "0.1", "--gail-disc-hidden-size", "32", "--gail-disc-num-layers", "1",
        "--gail-disc-num-heads", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]


def test_policy_rows_mark_sampled_labels_and_keep_a_truncated_next_state():
    from megatron_irl.training.sampling import SampleSet, policy_rows

    pad, eos = 3, 2
    # Row 0: prompt [1, 5], response [6] + EOS (finished). Row 1: prompt [1], response [7, 8]
    # cut by the budget: its last token stays an input so that its next state is in the row.
    tokens = torch.tensor([[1, 5, 6, eos, pad, pad], [1, 7, 8, pad, pad, pad]])
    ref_log_probs = torch.tensor([[0, 0, -1.0, -0.5, 0, 0], [0, -2.0, -4.0, 0, 0, 0]])
    rows = policy_rows(SampleSet(0, tokens, torch.tensor([2, 1]), torch.tensor([4, 3]),
                                 torch.tensor([True, False]), ref_log_probs), pad)
    assert rows["tokens"].tolist() == [[1, 5, 6, pad, pad, pad], [1, 7, 8, pad, pad, pad]]
    assert rows["labels"].tolist() == [[5, 6, eos, pad, pad, pad], [7, 8, pad, pad, pad, pad]]
    assert rows["policy_mask"].tolist() == [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert rows["terminal"].tolist() == [[False, False, True, False, False, False],
                                         [False] * 6]
    assert rows["document_ids"].tolist() == [[0, 0, 0, -1, -1, -1], [0, 0, 0, -1, -1, -1]]
    assert rows["position_ids"][1].tolist() == [0, 1, 2, 0, 0, 0]
    assert rows["ref_log_prob"].tolist() == [[0, -1, -0.5, 0, 0, 0], [-2, -4, 0, 0, 0, 0]]
    assert rows["next_position"][0].tolist() == [1, 2, 3, 4, 5, 6]
    assert not rows["loss_mask"].any()


@pytest.mark.parametrize("make, flag", [
    (lambda: TrainConfig(irl=IRLConfig(loss="online", fused_output_loss=True)),
     "--fused-output-loss"),
    (lambda: TrainConfig(irl=IRLConfig(loss="gail"), parallel=ParallelConfig(
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)),
     "--virtual-pipeline-model-parallel-size"),
    (lambda: TrainConfig(irl=IRLConfig(loss="online"), online=OnlineConfig(max_new_tokens=128)),
     "--online-max-new-tokens"),
    (lambda: TrainConfig(online=OnlineConfig(alpha_mix=0.5)), "--online-alpha-mix"),
    (lambda: TrainConfig(irl=IRLConfig(loss="online"), online=OnlineConfig(td_over="expert")),
     "--online-td-over expert with --irl-gamma 1"),
])
def test_sampling_losses_reject_what_they_cannot_run_naming_the_flag(make, flag):
    with pytest.raises(ConfigError, match=flag):
        make()


def test_online_with_alpha_mix_zero_logs_the_soft_q_losses(tmp_path):
    soft_q = run_train(tmp_path, 1, name="soft_q")
    online = run_train(tmp_path, 1, *ONLINE, "--online-alpha-mix", "0", name="online")
    for name in ("loss", "nll", "td_squared", "grad_norm"):
        assert_same_losses({s["iteration"]: s[name] for s in online},
                           {s["iteration"]: s[name] for s in soft_q}, rel=1e-6)
    assert all(step["policy_tokens"] > 0 for step in online)


def _finite(steps: list[dict], names: tuple[str, ...]) -> None:
    for step in steps:
        for name in names:
            assert math.isfinite(step[name]), (step["iteration"], name)


@pytest.fixture(scope="module")
def online_pp2_run(tmp_path_factory) -> list[dict]:
    return run_train(tmp_path_factory.mktemp("online"), 2, *PP2, *ONLINE,
                     "--online-alpha-mix", "0.5", "--online-td-over", "mixture")


def test_online_golden_loss_curve(online_pp2_run):
    assert_golden_losses("tiny_online_pp2_losses", online_pp2_run)


def test_online_trains_under_pp2_and_logs_the_mixture(online_pp2_run):
    steps = online_pp2_run
    _finite(steps, ("loss", "u_expert", "u_policy", "value_expert", "value_policy",
                    "reward", "reward_policy", "response_length", "eos_fraction"))
    assert [step["sample_step"] for step in steps] == [0, 0, 2, 2]
    assert all(step["update_seconds"] > 0 for step in steps)
    assert [step["sample_seconds"] > 0 for step in steps] == [True, False, True, False]
    assert all(1 <= step["response_length"] <= 16 for step in steps)


@pytest.fixture(scope="module")
def gail_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """GAIL at PP=2 for 5 steps, saving after step 3 (mid sampling interval: its samples come
    from step 2), and the same run resumed from that checkpoint. The saves run in the
    background (--async-save), so the resume also checks that the samples and discriminator
    saved are those of step 3, although the save completes during step 4."""
    tmp = tmp_path_factory.mktemp("gail")
    run = [*PP2, *GAIL, "--train-iters", "5"]
    whole = run_train(tmp, 2, *run, "--save-interval", "3", "--async-save", name="whole",
                      save=True)
    # Point the tracker back at step 3, as a user picks an older checkpoint to resume from.
    (tmp / "whole_ckpt" / "latest_checkpointed_iteration.txt").write_text("3\n")
    return {"whole": whole,
            "resumed": run_train(tmp, 2, *run, "--load", str(tmp / "whole_ckpt"), name="resumed")}


def test_gail_golden_loss_curve(gail_runs):
    assert_golden_losses("tiny_gail_pp2_losses", gail_runs["whole"])


def test_gail_trains_under_pp2_and_logs_its_metrics(gail_runs):
    steps = gail_runs["whole"]
    _finite(steps, ("loss", "nll", "reward", "reward_expert", "return", "entropy", "disc_loss",
                    "sample_seconds", "update_seconds"))
    assert all(0 <= step["disc_accuracy"] <= 1 for step in steps)
    assert steps[-1]["disc_loss"] < steps[0]["disc_loss"]  # the discriminator learns


def test_gail_kl_to_the_starting_model_is_zero_until_the_policy_moves(gail_runs):
    kl = [step["kl"] for step in gail_runs["whole"]]
    # Steps 1 and 2 train on samples drawn and scored by the starting weights: at step 1 the
    # policy is still those weights (only float rounding of other batch shapes differs).
    assert abs(kl[0]) < 1e-4
    # Later samples come from the moved policy: log pi - log pi_ref on them estimates
    # KL(pi || pi_ref) > 0, no longer about 0 as towards the sampling policy.
    assert all(value > 1e-3 for value in kl[2:]), kl


def test_gail_resume_continues_the_sampling_schedule_and_the_losses(gail_runs):
    whole, resumed = gail_runs["whole"], gail_runs["resumed"]
    assert [step["sample_step"] for step in whole] == [0, 0, 2, 2, 4]
    assert [step["sample_step"] for step in resumed] == [2, 4]
    # The resumed run penalises towards the same reference (<save>/gail_reference), not
    # towards the weights it resumed from.
    for name in ("loss", "disc_loss", "reward", "kl"):
        assert_same_losses({s["iteration"]: s[name] for s in resumed},
                           {s["iteration"]: s[name] for s in whole if s["iteration"] > 3})
    assert list(losses(resumed)) == [4, 5]
