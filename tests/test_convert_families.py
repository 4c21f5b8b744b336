"""Llama 3.x (RoPE scaling, tied embeddings) and Qwen3 (query/key norms) through the whole
path: a random tiny transformers model -> import -> ``megatron-irl rewards`` at TP 1 and 2,
whose log-probabilities and per-token rewards must equal those transformers' logits give;
and -> export, which must give back the original tensors bit for bit.

Every model has its own sizes (no other test uses them), grouped-query attention, random
norm weights, weights initialised with std 0.08 (with transformers' 0.02 the attention is so
flat that RoPE scaling moves these log-probabilities by less than the tolerance; with 0.08
it moves them by over 50 times the tolerance, checked below), and a 256-token vocabulary
(a multiple of 128, so the Megatron side has no padded rows whose zero logits would enter
the log-partition function).
"""

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")


from megatron_irl.convert import ConversionError, convert_to_hf, plan_import  # noqa: E402
from megatron_irl.testing import run_distributed  # noqa: E402
from helpers import make_tokenizer, read_safetensors  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 256
GAMMA = 0.9
ATOL = 1e-4

# name -> (transformers family, config keyword arguments)
MODELS = {
    # Llama 3.1-style: untied, RoPE scaling with a factor other than 3.1's 8.
    "llama31": ("Llama", dict(
        hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    # Llama 3.2-style: tied embeddings, factor 32, head_dim other than hidden / heads.
    "llama32": ("Llama", dict(
        hidden_size=48, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen3": ("Qwen3", dict(
        hidden_size=80, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=20, tie_word_embeddings=False,
        rope_theta=1000000.0)),
    "qwen3_tied": ("Qwen3", dict(
        hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=12, tie_word_embeddings=True, rope_theta=1000000.0)),
}
RECORDS = [{"prompt": "Q: What is 12 plus 30?\nA:", "response": " 42.", "score": 1.0},
           {"prompt": "Name a colour.", "response": " Teal, the colour of the sea.",
            "score": 0.0},
           {"prompt": "x", "response": " y z", "score": 0.5},
           {"prompt": "Write a long line of text about the weather, please: ",
            "response": "it rains in the morning, the sun comes out at noon, and in the evening "
                        "the wind turns cold and the sky clears up again.", "score": 0.2}]


# ------------------------------------------------------------------ Hugging Face side


CHAT_TEMPLATE = ("{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] "
                 "+ '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{%- endfor %}"
                 "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant"
                 "<|end_header_id|>\n\n' }}{%- endif %}")


def make_hf_model(directory: str, name: str, seed: int):
    """A random tiny model of MODELS saved with its tokenizer (the Llama ones with a chat
    template) and a generation config with sampling settings."""
    family, kwargs = MODELS[name]
    make_tokenizer(directory, VOCAB_SIZE, CHAT_TEMPLATE if family == "Llama" else None)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB_SIZE, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        max_position_embeddings=16384, initializer_range=0.08, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # random norms (q/k norms included), so that a swapped one shows
        for parameter_name, parameter in model.named_parameters():
            if "norm" in parameter_name:
                parameter.normal_(1.0, 0.1)
    model.generation_config.update(temperature=0.6, top_p=0.9, do_sample=True,
                                   eos_token_id=[2, 5])
    model.save_pretrained(directory, safe_serialization=True)
    return model


def transformers_rewards(model, tokens: list[int], lengths: list[int]) -> dict:
    """log pi(response | prompt) and delta_t = z_t[a_t] - gamma * V(s_t+1) (V = 0 after the
    last token) at the response positions, from transformers' float64 logits."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, :-1].double()  # [n-1, v]
    labels = torch.tensor(tokens[1:])
    chosen = logits.gather(1, labels[:, None])[:, 0]
    values = torch.logsumexp(logits, dim=-1)
    next_values = torch.cat([values[1:], values.new_zeros(1)])
    start = sum(lengths[:-1]) - 1  # the position that predicts the first response token
    return {"log_prob": float((chosen - values)[start:].sum()),
            "rewards": (chosen - GAMMA * next_values)[start:].tolist()}


# ------------------------------------------------------------------ Megatron side


def rank_import_all(pairs: list[tuple[str, str]]) -> None:
    from megatron_irl.convert import import_checkpoint

    for hf_dir, output_dir in pairs:
        import_checkpoint(plan_import(hf_dir, 2, world_size=1, dtype="float32"), output_dir)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


def run_rewards(load_dirs: list[str], data: str, tp: int) -> list[str]:
    """``megatron-irl rewards`` on each checkpoint at TP ``tp``, all in one launch of ``tp``
    processes (tests/rewards_launch.py runs the command once per checkpoint); the outputs."""
    outputs = [os.path.join(d, f"rewards-tp{tp}.jsonl") for d in load_dirs]
    commands = [["--load", d, "--data", data, "--output", out, "--gamma", str(GAMMA),
                 "--tensor-model-parallel-size", str(tp), "--progress-bar", "off"]
                for d, out in zip(load_dirs, outputs)]
    runs = json.dumps({"ports": free_ports(len(commands)), "commands": commands})
    processes = [subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "rewards_launch.py"), runs], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", RANK=str(rank),
                 LOCAL_RANK=str(rank), WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1"))
        for rank in range(tp)]
    try:
        outputs_of = [process.communicate(timeout=600) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (stdout, stderr) in zip(processes, outputs_of):
        assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return outputs


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every model of MODELS made, imported (one process, all in one call) and scored by
    ``megatron-irl rewards`` at TP 1 and TP 2. Returns {name: (hf dir, Megatron dir,
    transformers model, {tp: rewards lines})} and the records' tokens and lengths."""
    from megatron_irl.data import load_tokenizer
    from megatron_irl.evaluation.inputs import read_scored_pairs

    root = tmp_path_factory.mktemp("families")
    data = str(root / "records.jsonl")
    with open(data, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in RECORDS)
    dirs = {name: (str(root / name / "hf"), str(root / name / "mg")) for name in MODELS}
    models = {name: make_hf_model(hf, name, seed) for seed, (name, (hf, _)) in
              enumerate(dirs.items())}
    run_distributed(rank_import_all, 1, args=(list(dirs.values()),), timeout=300)
    load_dirs = [mg for _, mg in dirs.values()]
    lines = {}
    for tp in (1, 2):
        for name, output in zip(dirs, run_rewards(load_dirs, data, tp)):
            with open(output, encoding="utf-8") as file:
                lines.setdefault(name, {})[tp] = [json.loads(line) for line in file]
    pairs, _ = read_scored_pairs(data, load_tokenizer(dirs["qwen3"][1]), "score")
    return {name: (*dirs[name], models[name], lines[name]) for name in MODELS}, pairs


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("tp", [1, 2])
def test_rewards_command_log_probs_match_transformers(converted, name, tp):
    models, pairs = converted
    _, _, model, lines = models[name]
    assert [line["line"] for line in lines[tp]] == [1, 2, 3, 4]
    for pair, line in zip(pairs, lines[tp]):
        expected = transformers_rewards(model, pair.tokens, pair.segment_lengths)
        assert line["log_prob"] == pytest.approx(expected["log_prob"], abs=ATOL)
        torch.testing.assert_close(torch.tensor(line["rewards"], dtype=torch.float64),
                                   torch.tensor(expected["rewards"], dtype=torch.float64),
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama31", "llama32"])
def test_rope_scaling_moves_these_log_probs_far_beyond_the_tolerance(converted, name):
    """So that the log-probability test above tells scaled from plain RoPE."""
    models, pairs = converted
    model = models[name][2]
    config = copy.deepcopy(model.config)
    config.rope_parameters = {"rope_type": "default",
                              "rope_theta": config.rope_parameters["rope_theta"]}
    plain = type(model)(config).eval()
    plain.load_state_dict(model.state_dict())
    pair = pairs[-1]
    scaled = transformers_rewards(model, pair.tokens, pair.segment_lengths)["rewards"]
    unscaled = transformers_rewards(plain, pair.tokens, pair.segment_lengths)["rewards"]
    assert max(abs(a - b) for a, b in zip(scaled, unscaled)) > 50 * ATOL


def test_imported_model_sections_carry_rope_scaling_and_query_key_norms(converted):
    models, _ = converted
    sections = {}
    for name, (_, mg, _, _) in models.items():
        with open(os.path.join(mg, "model.yaml"), encoding="utf-8") as file:
            sections[name] = yaml.safe_load(file)["model"]
    assert [(s["use_rope_scaling"], s["rope_scaling_factor"], s["qk_layernorm"],
             s["untie_embeddings_and_output_weights"], s["kv_channels"])
            for s in sections.values()] == [(True, 4.0, False, True, 16),
                                            (True, 32.0, False, False, 24),
                                            (False, 8.0, True, True, 20),
                                            (False, 8.0, True, False, 12)]


@pytest.mark.parametrize("name", list(MODELS))
def test_export_gives_back_the_original_tensors_and_config(converted, name, tmp_path):
    models, _ = converted
    hf_dir, mg_dir, original, _ = models[name]
    convert_to_hf(mg_dir, str(tmp_path))
    source, exported = read_safetensors(hf_dir), read_safetensors(str(tmp_path))
    assert sorted(exported) == sorted(source)
    for tensor_name, tensor in source.items():
        assert exported[tensor_name].dtype == tensor.dtype, tensor_name
        assert torch.equal(exported[tensor_name], tensor), tensor_name
    for file_name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                      "generation_config.json"):
        source_file = os.path.join(hf_dir, file_name)
        if os.path.isfile(source_file):
            with open(source_file, "rb") as a, open(tmp_path / file_name, "rb") as b:
                assert a.read() == b.read(), file_name
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    if MODELS[name][0] == "Llama":
        assert tokenizer.apply_chat_template(messages, tokenize=False) == \
            transformers.AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(
                messages, tokenize=False)
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    assert (generation.eos_token_id, generation.temperature, generation.top_p) == ([2, 5], 0.6,
                                                                                  0.9)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(model) is type(original)
    assert model.config.rope_parameters == original.config.rope_parameters
    tokens = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100, 3]])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, original(tokens).logits)


# ------------------------------------------------------------------ refusals


def _config_with(tmp_path, **rope_scaling) -> str:
    make_hf_model(str(tmp_path), "llama31", seed=0)
    config = json.loads((tmp_path / "config.json").read_text())
    key = "rope_parameters" if "rope_parameters" in config else "rope_scaling"
    config[key].update(rope_scaling)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return key


@pytest.mark.parametrize("field,value", [("low_freq_factor", 2.0), ("high_freq_factor", 8.0),
                                         ("original_max_position_embeddings", 4096)])
def test_llama3_rope_parameters_megatron_core_fixes_are_refused_naming_the_field(
        tmp_path, field, value):
    key = _config_with(tmp_path, **{field: value})
    with pytest.raises(ConversionError, match=f"{key}.{field} {value!r} is not supported: "
                                              "Megatron-Core's Llama 3 RoPE scaling fixes it"):
        plan_import(str(tmp_path), 1)


def test_other_rope_scaling_types_are_refused(tmp_path):
    key = _config_with(tmp_path, rope_type="yarn")
    with pytest.raises(ConversionError, match=f"{key}.rope_type 'yarn' is not supported"):
        plan_import(str(tmp_path), 1)
