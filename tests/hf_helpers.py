"""A Hugging Face tokenizer for tests: characters, Llama 3 / ChatML special tokens."""

import string

SPECIALS = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(directory: str, vocab_size: int = 256, chat_template: str | None = None):
    """A character-level tokenizer of printable ASCII, the Llama 3 and ChatML special tokens
    and reserved special tokens up to ``vocab_size``, saved (with ``chat_template`` in its
    tokenizer_config.json when given); BOS <|begin_of_text|>, EOS <|end_of_text|>.
    Returns the transformers tokenizer."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, models

    characters = list(string.printable[:95])  # includes "\n"
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - len(SPECIALS) - 95)]
    vocab = {token: i for i, token in enumerate(SPECIALS + characters + reserved)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS + reserved])
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        unk_token="<unk>")
    if chat_template is not None:
        hf_tokenizer.chat_template = chat_template
    hf_tokenizer.save_pretrained(directory)
    return hf_tokenizer
