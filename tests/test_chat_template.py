"""Chat records rendered with the tokenizer's own chat template, checked against
transformers' apply_chat_template: the tokens, the trained-token mask (the assistant spans
transformers' return_assistant_tokens_mask marks with a template that carries
{% generation %} tags) and the eval prompt (add_generation_prompt)."""

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")


from megatron_irl.data import DataError, load_tokenizer  # noqa: E402
from megatron_irl.data.documents import InMemoryDocuments, response_mask  # noqa: E402
from megatron_irl.data.indexed import IndexedDocuments, preprocess_jsonl  # noqa: E402
from megatron_irl.evaluation.inputs import read_eval_prompts  # noqa: E402
from helpers import make_tokenizer, write_jsonl  # noqa: E402

# Llama 3-style: BOS, a system header always, content trimmed, <|eot_id|> ends each turn.
LLAMA3_STYLE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = 'You are a helpful assistant.' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endgeneration %}{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# Qwen-style (ChatML): a newline after each <|im_end|>, no BOS.
QWEN_STYLE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}{%- else %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
TEMPLATES = {"llama3": LLAMA3_STYLE, "qwen": QWEN_STYLE}
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? "},
    {"role": "assistant", "content": " It is 6. "},
    {"role": "user", "content": "(ignored: after the last assistant turn)"},
]
CHAT_RECORD = {"messages": MESSAGES}


def untagged(template: str) -> str:
    """The template as released models ship it: without generation tags."""
    return template.replace("{% generation %}", "").replace("{%- endgeneration %}", "")


def reference(hf_tokenizer, template: str, messages: list[dict]):
    """(input_ids, assistant mask) of transformers with the tagged template."""
    out = hf_tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def through_last_assistant(messages):
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last + 1]


@pytest.fixture(params=list(TEMPLATES))
def style(request, tmp_path):
    """(template name, tokenizer dir whose tokenizer_config.json holds the untagged
    template, transformers tokenizer, tagged template)."""
    tagged = TEMPLATES[request.param]
    directory = tmp_path / "tok"
    hf_tokenizer = make_tokenizer(str(directory), chat_template=untagged(tagged))
    # As the Llama 3.1 and Qwen2.5 releases ship it: in tokenizer_config.json (transformers
    # 5 saves it to chat_template.jinja, which is read first when present).
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = (directory / "chat_template.jinja").read_text()
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").unlink()
    return request.param, str(directory), hf_tokenizer, tagged


def documents_of(tmp_path, tokenizer, records=(CHAT_RECORD,)):
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    return InMemoryDocuments(path, tokenizer)


def assert_matches_reference(documents, hf_tokenizer, tagged):
    ids, mask = reference(hf_tokenizer, tagged, through_last_assistant(MESSAGES))
    tokens = documents.tokens(0).tolist()
    trained = response_mask(documents.segment_lengths(0)).astype(int).tolist()
    assert tokens == ids[:len(tokens)]
    assert trained == mask[:len(tokens)]
    assert sum(trained) == sum(mask) > 0  # every assistant token, nothing after the document
    return tokens, trained


def test_tokenizer_template_trains_exactly_the_assistant_tokens_transformers_marks(
        style, tmp_path):
    name, directory, hf_tokenizer, tagged = style
    tokenizer = load_tokenizer(directory)
    assert tokenizer.chat_template.source.endswith("tokenizer_config.json")
    tokens, trained = assert_matches_reference(documents_of(tmp_path, tokenizer),
                                               hf_tokenizer, tagged)
    end_of_turn = "<|eot_id|>" if name == "llama3" else "<|im_end|>"
    text = "".join(hf_tokenizer.convert_ids_to_tokens([t for t, r in zip(tokens, trained)
                                                        if r]))
    if name == "llama3":  # the template trims the content
        assert text == "4<|eot_id|>It is 6.<|eot_id|>"
    else:  # the newline after <|im_end|> is not trained
        assert text == "4<|im_end|> It is 6. <|im_end|>"
    end_of_turn = {"llama3": "<|eot_id|>", "qwen": "<|im_end|>"}[name]
    assert hf_tokenizer.convert_ids_to_tokens(tokens[-1]) == end_of_turn  # the document's end


def test_chat_template_file_with_generation_tags_overrides_the_tokenizers(style, tmp_path):
    _, directory, hf_tokenizer, tagged = style
    template_file = tmp_path / "tagged.jinja"
    template_file.write_text(tagged)
    tokenizer = load_tokenizer(directory, str(template_file))
    assert tokenizer.chat_template.has_generation_tags
    assert_matches_reference(documents_of(tmp_path, tokenizer), hf_tokenizer, tagged)


def test_eval_prompt_ends_where_the_assistant_turn_begins(style, tmp_path):
    _, directory, hf_tokenizer, tagged = style
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT_RECORD])
    (prompt,), _ = read_eval_prompts(path, load_tokenizer(directory))
    last = max(i for i, m in enumerate(MESSAGES) if m["role"] == "assistant")
    expected = hf_tokenizer.apply_chat_template(MESSAGES[:last], chat_template=tagged,
                                                tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"]
    assert prompt.prompt_tokens == list(expected)
    assert prompt.reference == " It is 6. "


def test_data_report_names_the_template_and_preprocessing_keeps_it(style, tmp_path):
    _, directory, _, _ = style
    tokenizer = load_tokenizer(directory)
    documents = documents_of(tmp_path, tokenizer)
    assert f"chat template {tokenizer.chat_template.source} (sha256 " in \
        documents.report.format()
    preprocess_jsonl(str(tmp_path / "chat.jsonl"), tokenizer, str(tmp_path / "pre"))
    indexed = IndexedDocuments(str(tmp_path / "pre"), tokenizer)
    assert np.array_equal(indexed.tokens(0), documents.tokens(0))
    assert np.array_equal(indexed.segment_lengths(0), documents.segment_lengths(0))
    with pytest.raises(DataError, match="preprocessed with a different tokenizer"):
        IndexedDocuments(str(tmp_path / "pre"), load_tokenizer(
            directory, str(write_jsonl(tmp_path / "other.jinja", ["{{ messages }}"]))))


def test_tokenizer_without_template_keeps_the_built_in_rendering(tmp_path):
    directory = str(tmp_path / "tok")
    make_tokenizer(directory)
    tokenizer = load_tokenizer(directory)
    assert tokenizer.chat_template is None
    documents = documents_of(tmp_path, tokenizer)
    start = [tokenizer.bos_id] + tokenizer.encode(
        "System: Be brief.\nUser: What is 2+2?\nAssistant: 4\n")
    assert documents.tokens(0)[:len(start)].tolist() == start
    assert "built-in (System:/User:/Assistant: lines)" in documents.report.format()


def test_template_that_rewrites_earlier_turns_is_refused_naming_the_record(tmp_path):
    # The last assistant turn is rendered differently from earlier ones (as Qwen3's
    # template drops the reasoning of earlier turns): spans cannot be found by prefixes.
    rewriting = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
                 "{%- if m['role'] == 'assistant' and loop.last %}{{- '<think></think>' }}"
                 "{%- endif %}{{- m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
                 "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    directory = str(tmp_path / "tok")
    make_tokenizer(directory, chat_template=rewriting)
    with pytest.raises(DataError, match=r"chat\.jsonl:1: chat template .* does not render "
                                        r"messages\[2\] \(assistant\).*generation"):
        documents_of(tmp_path, load_tokenizer(directory))
    single_turn = {"messages": MESSAGES[:3]}  # one assistant turn: its prefix is stable
    documents = documents_of(tmp_path, load_tokenizer(directory), [single_turn])
    trained = [t for t, r in zip(documents.tokens(0).tolist(), response_mask(
        documents.segment_lengths(0))) if r]
    tokenizer = load_tokenizer(directory)
    assert trained == tokenizer.encode("<think></think>4<|im_end|>")


def test_packed_rows_train_the_assistant_tokens_and_end_at_the_end_of_turn(style, tmp_path):
    from megatron_irl.data import SFTDataset

    name, directory, hf_tokenizer, tagged = style
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT_RECORD])
    row = SFTDataset(path, load_tokenizer(directory), seq_length=256).row(0)
    ids, mask = reference(hf_tokenizer, tagged, through_last_assistant(MESSAGES))
    trained_labels = row["labels"][row["loss_mask"] == 1].tolist()
    assert trained_labels == [t for t, m in zip(ids, mask) if m]
    (terminal,) = np.flatnonzero(row["terminal"])
    end_of_turn = {"llama3": "<|eot_id|>", "qwen": "<|im_end|>"}[name]
    assert hf_tokenizer.convert_ids_to_tokens(int(row["labels"][terminal])) == end_of_turn


def test_named_templates_in_tokenizer_config_use_the_default_one(tmp_path):
    directory = tmp_path / "tok"
    make_tokenizer(str(directory))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"},
                               {"name": "default", "template": QWEN_STYLE}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(str(directory)).chat_template.text == QWEN_STYLE
    config["chat_template"] = config["chat_template"][:1]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="tokenizer_config.json: chat_template has no template "
                                        "named 'default'"):
        load_tokenizer(str(directory))


def test_rewards_documents_are_the_training_documents_and_eval_samples_get_one_bos(tmp_path):
    from megatron_irl.evaluation.inputs import read_scored_pairs

    directory = str(tmp_path / "tok")
    make_tokenizer(directory, chat_template=untagged(LLAMA3_STYLE))
    tokenizer = load_tokenizer(directory)
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT_RECORD])
    (pair,), _ = read_scored_pairs(path, tokenizer, "score")
    documents = documents_of(tmp_path, tokenizer)
    assert pair.tokens == documents.tokens(0).tolist()
    assert pair.segment_lengths == documents.segment_lengths(0).tolist()
    # An eval sample: the rendered prompt (which starts with the BOS text) and a response.
    (prompt,), _ = read_eval_prompts(path, tokenizer)
    sample = write_jsonl(tmp_path / "samples.jsonl", [{"prompt": prompt.prompt,
                                                       "response": "It is 6."}])
    (pair,), _ = read_scored_pairs(sample, tokenizer, "score")
    assert pair.tokens[:len(prompt.prompt_tokens)] == prompt.prompt_tokens
    assert pair.tokens.count(tokenizer.bos_id) == 1
