"""``megatron-irl plan`` and its estimates (``megatron_irl.planning``).

The estimates are checked against real Megatron-Core models built on CPU by the trainer's own
``build_trainable`` (model, DDP, optimizer) in spawned gloo ranks: parameters per rank exactly,
and the bytes of weights, gradient buffers and optimizer state within ``MEMORY_TOLERANCE``. The
shipped recipes are planned exactly as their header comments tell users to.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from megatron_irl.arguments import load_train_config
from megatron_irl.commands import plan
from megatron_irl.config import TrainConfig
from megatron_irl.core.vocabulary import padded_vocab_size
from megatron_irl.planning import memory_estimate as planning
from megatron_irl.testing import run_distributed

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "examples" / "recipes").glob("*.yaml"))
# The estimates of these tiny models are exact (measured); the tolerance leaves room for the
# distributed optimizer's padding of its buffers, which the estimate does not count.
MEMORY_TOLERANCE = 0.01

# Tiny models covering the formula's branches. A: LayerNorm, GeLU, linear biases, learned
# positions, tied embeddings, bf16, distributed optimizer over 2 data-parallel ranks.
# B: RMSNorm, SwiGLU, grouped-query attention with q/k/v biases only, RoPE, tied embeddings
# across pipeline stages (a copy on the last stage), two model chunks per stage, fp32, and a
# vocabulary whose padding depends on TP (lcm(25, 2) = 50).
TINY_A = dict(
    model=dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
               hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=128,
               transformer_impl="local"),
    training=dict(bf16=True, micro_batch_size=1, global_batch_size=2),
    parallel=dict(use_distributed_optimizer=True),
)
TINY_B = dict(
    model=dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
               seq_length=32, normalization="RMSNorm", swiglu=True,
               position_embedding_type="rope", add_bias_linear=False, add_qkv_bias=True,
               hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=25,
               transformer_impl="local"),
    parallel=dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                  virtual_pipeline_model_parallel_size=2),
    training=dict(micro_batch_size=1, global_batch_size=2),
)
TINY_VOCAB = 1001


def _measure_built_model(config: dict, vocab_size: int) -> dict:
    """On each rank: build the trainer's model and optimizer, take one (zero-gradient)
    optimizer step so that Adam's state exists, and measure the tensors."""
    from megatron.core import parallel_state

    from megatron_irl.training.loop import build_trainable

    trainable = build_trainable(TrainConfig.from_dict(config), vocab_size)
    for chunk in trainable.model:
        chunk.zero_grad_buffer()
    trainable.optimizer.zero_grad()
    trainable.optimizer.step()
    params = [p for chunk in trainable.chunks for p in chunk.parameters()]
    model_storage = {p.untyped_storage().data_ptr() for p in params}
    optimizer_bytes = 0
    for optimizer in getattr(trainable.optimizer, "chained_optimizers", [trainable.optimizer]):
        torch_optimizer = optimizer.optimizer
        for state in torch_optimizer.state.values():
            optimizer_bytes += sum(v.nbytes for v in state.values()
                                   if hasattr(v, "nbytes") and v.dim() > 0)  # not "step"
        for group in torch_optimizer.param_groups:  # fp32 main copies, not the weights
            optimizer_bytes += sum(p.nbytes for p in group["params"]
                                   if p.untyped_storage().data_ptr() not in model_storage)
    return {
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
        "layers": [[layer.layer_number - 1 for layer in chunk.decoder.layers]
                   for chunk in trainable.chunks],
        "parameters": sum(p.numel() for p in params),
        "weights": sum(p.nbytes for p in params),
        "gradients": sum(buffer.grad_data.nbytes for ddp in trainable.model
                         for buffer in ddp.buffers),
        "optimizer": optimizer_bytes,
    }


@pytest.fixture(scope="module")
def tiny_a_measured():
    return run_distributed(_measure_built_model, 2, args=(TINY_A, TINY_VOCAB))


@pytest.fixture(scope="module")
def tiny_b_measured():
    return run_distributed(_measure_built_model, 4, tp=2, pp=2, vpp=2, args=(TINY_B, TINY_VOCAB))


def _estimate(config: dict, data_parallel: int) -> list[planning.StageMemory]:
    cfg = TrainConfig.from_dict(config)
    padded = padded_vocab_size(TINY_VOCAB, cfg.model.make_vocab_size_divisible_by,
                               cfg.parallel.tensor_model_parallel_size)
    return planning.estimate_memory(cfg, padded, data_parallel)


def _assert_matches(measured: list[dict], stages: list[planning.StageMemory],
                    distributed_optimizer: bool) -> None:
    for rank in measured:
        stage = stages[rank["stage"]]
        assert rank["parameters"] == stage.parameters
        assert [list(r) for r in stage.layers] == rank["layers"]
        optimizer = stage.optimizer_sharded if distributed_optimizer \
            else stage.optimizer_replicated
        for name, estimate in (("weights", stage.weights), ("gradients", stage.gradients),
                               ("optimizer", optimizer)):
            assert estimate == pytest.approx(rank[name], rel=MEMORY_TOLERANCE), name


def test_estimate_matches_the_built_model_at_tp1_with_the_distributed_optimizer(
        tiny_a_measured):
    _assert_matches(tiny_a_measured, _estimate(TINY_A, data_parallel=2),
                    distributed_optimizer=True)


def test_estimate_matches_the_built_model_at_tp2_pp2_interleaved(tiny_b_measured):
    _assert_matches(tiny_b_measured, _estimate(TINY_B, data_parallel=1),
                    distributed_optimizer=False)


def test_model_parameters_match_the_published_llama3_sizes():
    for recipe, published in (("llama3-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496)):
        cfg = load_train_config(["--config", str(REPO / "examples" / "recipes" / f"{recipe}.yaml")])
        assert planning.model_parameters(cfg.model, 128256) == published, recipe


def test_model_parameters_match_the_published_llama31_and_qwen3_sizes():
    # Qwen3-8B: 151936 embedding rows and 2 x 128 query/key norm weights per layer.
    for recipe, published, vocab in (("llama3.1-8b", 8_030_261_248, 128256),
                                     ("qwen3-8b", 8_190_735_360, 151936)):
        cfg = load_train_config(["--config", str(REPO / "examples" / "recipes" / f"{recipe}.yaml")])
        assert planning.model_parameters(cfg.model, vocab) == published, recipe


# ------------------------------------------------------------------------------ the command


def _plan_lines(recipe: Path) -> list[list[str]]:
    """The ``megatron-irl plan`` commands in a recipe's header, as argument lists."""
    return [shlex.split(match)[2:] for match in
            re.findall(r"^#\s+(megatron-irl plan .*)$", recipe.read_text(), re.MULTILINE)]


def test_every_recipe_documents_a_bf16_and_an_fp8_plan():
    assert len(RECIPES) >= 4
    for recipe in RECIPES:
        lines = _plan_lines(recipe)
        assert len(lines) == 2, recipe.name
        assert "--fp8-format" in lines[1] and "--fp8-format" not in lines[0], recipe.name


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_plans_fit_and_print_a_layout_of_its_tp_and_pp(recipe, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    for argv in _plan_lines(recipe):
        assert plan.main(argv) == 0, argv
        out = capsys.readouterr().out
        cfg = load_train_config(argv[:2])
        tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        world = int(argv[argv.index("--nodes") + 1]) * int(argv[argv.index("--gpus-per-node") + 1])
        assert f"TP {tp} x PP {pp} x DP {world // (tp * pp)}" in out
        stage_lines = re.findall(r"^  stage (\d+): ranks (\d+)-(\d+)\b.*: layers (\d+-\d+)", out,
                                 re.MULTILINE)
        assert [int(s[0]) for s in stage_lines] == list(range(pp))
        ranks = [r for _, first, last, _ in stage_lines for r in range(int(first), int(last) + 1)]
        assert ranks == list(range(world))
        layers = [n for *_, span in stage_lines
                  for n in range(int(span.split("-")[0]), int(span.split("-")[1]) + 1)]
        assert layers == list(range(cfg.model.num_layers))
        assert "verdict: fits" in out


def test_recipe_submission_line_asks_for_the_planned_nodes():
    for recipe in RECIPES:
        plan_nodes = {line[line.index("--nodes") + 1] for line in _plan_lines(recipe)}
        submitted = set(re.findall(r"sbatch --nodes=(\d+) .*slurm/train\.sbatch",
                                   recipe.read_text()))
        assert submitted and submitted == plan_nodes, recipe.name


LLAMA_8B = REPO / "examples" / "recipes" / "llama3-8b.yaml"
LLAMA_8B_PLAN = ["--config", str(LLAMA_8B), "--nodes", "1", "--vocab-size", "128256"]


@pytest.mark.parametrize("flags, named", [
    (["--tensor-model-parallel-size", "3"],
     ["--num-attention-heads", "--tensor-model-parallel-size"]),
    (["--pipeline-model-parallel-size", "3"], ["--num-layers", "--pipeline-model-parallel-size"]),
    (["--ffn-hidden-size", "14335"], ["--ffn-hidden-size", "--tensor-model-parallel-size"]),
    (["--make-vocab-size-divisible-by", "100", "--tensor-model-parallel-size", "8"],
     ["--tensor-model-parallel-size", "--make-vocab-size-divisible-by"]),
    (["--global-batch-size", "6"], ["--global-batch-size", "--micro-batch-size"]),
], ids=["heads", "layers", "ffn", "vocab", "batch"])
def test_layout_that_does_not_divide_fails_naming_the_flags(flags, named, capsys):
    assert plan.main(LLAMA_8B_PLAN + flags) == 2
    error = capsys.readouterr().err
    for flag in named:
        assert flag in error


def test_world_size_that_does_not_divide_fails_naming_the_flags(capsys):
    argv = ["--config", str(LLAMA_8B), "--world-size", "5", "--vocab-size", "128256"]
    assert plan.main(argv) == 2
    assert "--tensor-model-parallel-size" in capsys.readouterr().err


def test_missing_tokenizer_without_vocab_size_asks_for_vocab_size(capsys):
    assert plan.main(["--config", str(LLAMA_8B), "--nodes", "1"]) == 2
    assert "--vocab-size" in capsys.readouterr().err


def test_missing_input_paths_are_listed_not_refused(capsys):
    assert plan.main(LLAMA_8B_PLAN + ["--train-data-path", "no/such/train.jsonl"]) == 0
    assert "--train-data-path no/such/train.jsonl: does not exist" in capsys.readouterr().out


def test_vocab_size_is_read_from_an_existing_tokenizer(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert plan.main(["--config", "examples/tiny.yaml", "--world-size", "2"]) == 0
    assert "320 tokens (--tokenizer-model examples/data/tokenizer.model)" in \
        capsys.readouterr().out


def test_plan_over_gpu_memory_exits_1(capsys):
    argv = LLAMA_8B_PLAN + ["--tensor-model-parallel-size", "1", "--sequence-parallel", "false",
                            "--recompute-granularity", ""]
    assert plan.main(argv) == 1
    assert "verdict: does not fit" in capsys.readouterr().out


def test_world_size_and_nodes_exclude_each_other(capsys):
    assert plan.main(LLAMA_8B_PLAN + ["--world-size", "8"]) == 2
    assert "--world-size" in capsys.readouterr().err


def test_in_flight_micro_batches_follow_the_pipeline_schedules():
    assert planning.in_flight_chunks(0, pp=1, vpp=None, num_microbatches=8) == 1
    assert [planning.in_flight_chunks(s, 4, None, 8) for s in range(4)] == [4, 3, 2, 1]
    assert planning.in_flight_chunks(0, 4, None, 2) == 2  # fewer micro-batches than stages
    # Interleaved, PP 4 x 2 chunks: 2 (PP - 1) + (VPP - 1) PP + 1 = 11 chunk passes.
    assert planning.in_flight_chunks(0, 4, 2, 8) == 11


def test_recomputation_lowers_the_activation_estimate_in_order():
    def activations(**training) -> int:
        cfg = load_train_config(["--config", str(LLAMA_8B), *[
            arg for key, value in training.items() for arg in (f"--{key}", value)]])
        return planning.estimate_memory(cfg, 128256, data_parallel=4)[0].activations

    none = activations(**{"recompute-granularity": ""})
    selective = activations(**{"recompute-granularity": "selective"})
    full = activations(**{"recompute-granularity": "full", "recompute-method": "uniform",
                          "recompute-num-layers": "1"})
    assert none > selective > full


# ------------------------------------------------------------------------------ GAIL's reference

TINY_A_GAIL_KL = {**TINY_A, "irl": dict(loss="gail"), "online": dict(max_new_tokens=16),
                  "gail": dict(kl_weight=0.1)}


def _measure_kl_reference(config: dict, vocab: int) -> int:
    from megatron_irl.training.reference import ReferencePolicy

    reference = ReferencePolicy(TrainConfig.from_dict(config), vocab)
    return sum(p.nbytes for p in reference.chunk.parameters())


def test_kl_reference_memory_is_a_measured_copy_of_the_weights_in_the_plan(capsys):
    [measured] = run_distributed(_measure_kl_reference, 1, args=(TINY_A_GAIL_KL, TINY_VOCAB))
    [with_kl], [without] = _estimate(TINY_A_GAIL_KL, 1), _estimate(TINY_A, 1)
    assert with_kl.kl_reference == measured == without.weights
    assert without.kl_reference == 0
    assert with_kl.total(True) - without.total(True) == measured
    assert plan.main(LLAMA_8B_PLAN + ["--irl-loss", "gail", "--gail-kl-weight", "0.1",
                                      "--online-max-new-tokens", "64",
                                      "--sequence-parallel", "false"]) in (0, 1)
    assert "KL ref: GAIL's frozen copy" in capsys.readouterr().out
