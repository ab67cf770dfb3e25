"""Chat templates (flexrun/models/chat.py): prompts rendered exactly as transformers'
apply_chat_template renders them, and the same token ids, for the real templates of the
supported families (tests/data/chat_templates, see SOURCES.md) and SmolLM2's GGUF; validation
errors; template files; special tokens read by the loaders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexrun.config import FlexrunError
from flexrun.models.chat import (chat_ids, chat_prompt_ids, check_messages, content_format,
                                 hf_chat_config, load_template, no_template_error,
                                 render_chat, resolve_template)

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

# per template: the tokenizer's named special tokens (as the model's tokenizer_config.json has
# them), and the added tokens its prompts use (special / plain) so that they encode whole
FAMILIES = {
    "llama-3.1-instruct": dict(
        names={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        special=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|eom_id|>", "<|python_tag|>"]),
    "mistral-7b-instruct-v0.3": dict(
        names={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]",
                 "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                 "[/TOOL_RESULTS]"]),
    "qwen2.5-instruct": dict(
        names={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        plain=["<tool_call>", "</tool_call>"]),
    "qwen3": dict(
        names={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        plain=["<think>", "</think>", "<tool_call>", "</tool_call>"]),
    "phi-3.5-mini-instruct": dict(
        names={"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
               "pad_token": "<|endoftext|>"},
        special=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|end|>"]),
    "gemma-2-it": dict(
        names={"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
               "pad_token": "<pad>"},
        special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]),
    # a system message goes before the first user turn; content parts are iterated (openai)
    "gemma-3-it": dict(
        names={"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
               "pad_token": "<pad>"},
        special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>"], format="openai"),
    "smollm2-135m-instruct": dict(
        names={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"},
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
}
NO_SYSTEM = {"gemma-2-it"}

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
USER = {"role": "user", "content": "  What is the capital of France?\n"}
ASSISTANT = {"role": "assistant", "content": " Paris, on the Seine. "}
USER2 = {"role": "user", "content": "And of Italy? Ünïcödé, \"quotes\" & <tags>"}
PARTS = {"role": "user", "content": [{"type": "text", "text": "Read this:"},
                                     {"type": "text", "text": "the quick brown fox"}]}
CONVERSATIONS = {
    "user": [USER],
    "system+user": [SYSTEM, USER],
    "multi-turn": [SYSTEM, USER, ASSISTANT, USER2],
    "parts": [SYSTEM, PARTS],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def _for_hf(conversation: list[dict]) -> list[dict]:
    """What transformers gets for a string-content template: parts joined by newlines."""
    return [{**m, "content": "\n".join(p["text"] for p in m["content"])}
            if isinstance(m["content"], list) else m for m in conversation]


def _without_system(conversation: list[dict]) -> list[dict]:
    return [m for m in conversation if m["role"] != "system"]


@pytest.fixture(scope="module")
def base_bpe():
    """A small byte-level BPE (as conftest.make_tokenizer trains) that adds a BOS of its own
    on encode: chat prompts must be encoded without it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for m in (SYSTEM, USER, ASSISTANT, USER2)] + [
        "system user assistant model", "You are a helpful assistant", "Cutting Knowledge Date"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|bos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                       special_tokens=[("<|bos|>", 1)])
    return tok.to_str()


def _tokenizers(base_json: str, name: str, template: str):
    """(flexrun's tokenizers.Tokenizer, transformers' tokenizer) of one family, offline: the
    same BPE with the family's added tokens, and the template set on the transformers one."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast
    fam = FAMILIES[name]
    tok = Tokenizer.from_str(base_json)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in fam["special"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in fam.get("plain", [])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **fam["names"])
    return tok, hf


@pytest.fixture(scope="module")
def families(base_bpe):
    out = {}
    for name in FAMILIES:
        template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
        out[name] = (template, *_tokenizers(base_bpe, name, template))
    return out


def _cases(name: str):
    for label, conv in CONVERSATIONS.items():
        if name in NO_SYSTEM:
            conv = _without_system(conv)
        for agp in (True, False):
            yield label, conv, agp


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_matches_transformers(families, name):
    """Text and ids as apply_chat_template(tokenize=False / True) gives them, for every
    conversation, with and without the generation prompt."""
    template, tok, hf = families[name]
    assert hf.special_tokens_map == FAMILIES[name]["names"]
    fmt = FAMILIES[name].get("format", "string")
    assert content_format(template) == fmt
    for label, conv, agp in _cases(name):
        hf_conv = _for_hf(conv) if fmt == "string" else conv   # flexrun joins the parts
        want = hf.apply_chat_template(hf_conv, tokenize=False, add_generation_prompt=agp)
        got = render_chat(template, conv, add_generation_prompt=agp,
                          special_tokens=FAMILIES[name]["names"])
        assert got == want, (name, label, agp)
        want_ids = hf.apply_chat_template(hf_conv, tokenize=True, return_dict=False,
                                          add_generation_prompt=agp)
        assert chat_ids(tok, got) == want_ids, (name, label, agp)
        assert chat_ids(tok, got) != tok.encode(got).ids     # the BPE's own BOS is left out


def test_generation_prompt_default_true(families):
    template, _, hf = families["qwen2.5-instruct"]
    conv = CONVERSATIONS["system+user"]
    assert render_chat(template, conv) == hf.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=True)
    assert render_chat(template, conv).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name,extra", [
    ("qwen3", {"enable_thinking": False}),
    ("qwen2.5-instruct", {"tools": TOOLS}),
    ("qwen3", {"tools": TOOLS}),
    ("llama-3.1-instruct", {"tools": TOOLS, "date_string": "01 Jan 2026"}),
    ("llama-3.1-instruct", {"tools": TOOLS, "tools_in_user_message": False}),
])
def test_template_variables(families, name, extra):
    """Extra variables reach the template as they do in transformers (tools through its tojson
    filter: no HTML escaping, indent=4 for Llama 3.1)."""
    template, tok, hf = families[name]
    conv = CONVERSATIONS["multi-turn"]
    want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, **extra)
    got = render_chat(template, conv, special_tokens=FAMILIES[name]["names"], **extra)
    assert got == want
    assert "°C" in got if "tools" in extra else "<think>\n\n</think>" in got


def test_reasoning_content_alias(families):
    """reasoning / thinking fields reach Qwen3's template as reasoning_content."""
    template, _, hf = families["qwen3"]
    conv = [USER, {"role": "assistant", "content": "Paris.", "reasoning": "It is Paris."}]
    want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
    assert render_chat(template, conv, add_generation_prompt=False) == want
    assert "<think>\nIt is Paris.\n</think>" in want


def test_template_exceptions_become_flexrun_errors(families):
    gemma = families["gemma-2-it"][0]
    with pytest.raises(FlexrunError, match="System role not supported"):
        render_chat(gemma, CONVERSATIONS["system+user"])
    with pytest.raises(FlexrunError, match="roles must alternate"):
        render_chat(gemma, [USER, USER2])
    mistral = families["mistral-7b-instruct-v0.3"][0]
    with pytest.raises(FlexrunError, match="Only user and assistant roles are supported"):
        render_chat(mistral, [SYSTEM, USER, {"role": "narrator", "content": "x"}])
    with pytest.raises(FlexrunError, match="not valid Jinja"):
        render_chat("{% for m in messages %}{{ m.content }}", [USER])
    with pytest.raises(FlexrunError, match="failed on this conversation"):
        render_chat("{{ messages[0].content + 1 }}", [USER])
    with pytest.raises(FlexrunError, match="failed on this conversation"):    # sandboxed
        render_chat("{{ messages.__class__.__mro__ }}", [USER])


def test_content_parts_for_list_templates():
    """A template that loops over a message's content gets the parts, as in transformers."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    template = ("{% for message in messages %}<{{ message['role'] }}>"
                "{% if message['content'] is string %}{{ message['content'] }}"
                "{% else %}{% for part in message['content'] %}[{{ part['type'] }}:"
                "{{ part['text'] }}]{% endfor %}{% endif %}{% endfor %}")
    assert content_format(template) == "openai"
    conv = CONVERSATIONS["parts"]
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()),
                                 chat_template=template)
    want = hf.apply_chat_template(conv, tokenize=False)
    assert render_chat(template, conv) == want
    assert "[text:Read this:][text:the quick brown fox]" in want
    aliased = ("{% set loop_messages = messages[1:] %}{% for m in loop_messages %}"
               "{% set c = m.content %}{% for p in c %}{{ p.text }}{% endfor %}{% endfor %}")
    assert content_format(aliased) == "openai"


@pytest.mark.parametrize("messages,match", [
    ("hello", "must be a list"),
    ({"role": "user", "content": "hi"}, "must be a list"),
    ([], "at least one message"),
    (["hi"], "message 0 must be an object"),
    ([{"content": "hi"}], "message 0 needs a \"role\""),
    ([USER, {"role": "assistant"}], "message 1 \\(assistant\\) has no \"content\""),
    ([{"role": "user", "content": 3}], "must be a string or a list"),
    ([{"role": "user", "content": []}], "empty list"),
    ([{"role": "user", "content": ["hi"]}], "content part 0 must be an object"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "type 'image_url': only \"text\" parts"),
    ([{"role": "user", "content": [{"type": "text"}]}], "needs a string \"text\""),
    ([{"role": "user", "content": "hi", "when": object()}], "object values are not allowed"),
])
def test_message_validation(messages, match):
    with pytest.raises(FlexrunError, match=match) as e:
        render_chat("{{ messages }}", messages)
    assert "\n" not in str(e.value)


def test_none_keys_dropped():
    assert check_messages([{"role": "user", "content": "hi", "name": None}]) == [
        {"role": "user", "content": "hi"}]


def test_load_template(tmp_path, families):
    qwen = families["qwen2.5-instruct"][0]
    (tmp_path / "t.jinja").write_text(qwen, encoding="utf-8")
    assert load_template(tmp_path / "t.jinja") == qwen
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": qwen}))
    assert load_template(tmp_path / "tokenizer_config.json") == qwen
    (tmp_path / "named.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "{{ 'tools' }}"},
        {"name": "default", "template": qwen}]}))
    assert load_template(tmp_path / "named.json") == qwen
    for fname, body, match in [
            ("missing.jinja", None, "not found"),
            ("empty.jinja", "  \n", "is empty"),
            ("bad.jinja", "{% if x %}", "not valid Jinja"),
            ("bad.json", "{", "not valid JSON"),
            ("nokey.json", json.dumps({"bos_token": "<s>"}), "no \"chat_template\" key"),
            ("nodefault.json", json.dumps({"chat_template": [{"name": "rag", "template": "x"}]}),
             "none named \"default\"")]:
        if body is not None:
            (tmp_path / fname).write_text(body)
        with pytest.raises(FlexrunError, match=match):
            load_template(tmp_path / fname)


def test_resolve_template(tmp_path):
    assert resolve_template(None, "{{ 1 }}", "m") == "{{ 1 }}"
    assert resolve_template("{{ 2 }}", "{{ 1 }}", "m") == "{{ 2 }}"
    (tmp_path / "t.jinja").write_text("{{ 3 }}")
    assert resolve_template(str(tmp_path / "t.jinja"), None, "m") == "{{ 3 }}"
    with pytest.raises(FlexrunError, match="neither a Jinja template nor an existing file"):
        resolve_template(str(tmp_path / "nope.jinja"), None, "m")
    with pytest.raises(FlexrunError) as e:
        resolve_template(None, None, "models/x")
    assert str(e.value) == str(no_template_error("models/x")) == (
        "models/x has no chat template: pass --chat-template FILE")


def test_hf_dir_template_and_special_tokens(tmp_path, llama_dir, families):
    """open_hf_dir reads the template (chat_template.jinja first, else tokenizer_config.json's,
    a list of named templates giving "default") and the special tokens (strings or
    {"content": ...}); a prompt comes out as transformers' AutoTokenizer makes it."""
    from transformers import AutoTokenizer
    from flexrun.models.loader import open_hf_dir
    qwen = families["qwen2.5-instruct"][0]
    d = tmp_path / "m"
    d.mkdir()
    for f in llama_dir.iterdir():
        if f.name != "tokenizer_config.json":
            (d / f.name).symlink_to(f)
    cfg = {"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False,
                         "normalized": False, "rstrip": False, "single_word": False,
                         "special": True},
           "eos_token": "</s>", "pad_token": "<pad>", "unk_token": None,
           "chat_template": [{"name": "default", "template": qwen},
                             {"name": "tool_use", "template": "{{ 'tools' }}"}],
           "tokenizer_class": "PreTrainedTokenizerFast"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ck = open_hf_dir(str(d))
    assert ck.chat_template == qwen
    assert ck.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    hf = AutoTokenizer.from_pretrained(str(d))
    assert hf.special_tokens_map == ck.special_tokens
    conv = CONVERSATIONS["multi-turn"]
    assert chat_prompt_ids(ck, conv) == hf.apply_chat_template(
        conv, tokenize=True, return_dict=False, add_generation_prompt=True)
    (d / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0].content }}")
    assert hf_chat_config(d)[0] == "{{ bos_token }}{{ messages[0].content }}"
    assert open_hf_dir(str(d)).chat_template == "{{ bos_token }}{{ messages[0].content }}"


def test_dummy_has_no_template():
    from flexrun.models.loader import open_checkpoint
    ck = open_checkpoint("dummy:opt-125m")
    assert ck.special_tokens == {}
    with pytest.raises(FlexrunError, match="has no chat template: pass --chat-template FILE"):
        chat_prompt_ids(ck, [USER])


# ---- the real SmolLM2 GGUF ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_ckpt(smollm2_gguf):
    from flexrun.models.loader import open_gguf
    return open_gguf(str(smollm2_gguf))


def test_smollm2_gguf_template_and_tokens(smollm2_ckpt, hf_gguf_tokenizer):
    from flexrun.models.gguf_tokenizer import gguf_chat_template
    ck = smollm2_ckpt
    assert ck.chat_template == gguf_chat_template(ck.source) == hf_gguf_tokenizer.chat_template
    assert ck.chat_template == (TEMPLATES / "smollm2-135m-instruct.jinja").read_text()
    assert ck.special_tokens == hf_gguf_tokenizer.special_tokens_map == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>"}


def test_smollm2_gguf_matches_transformers(smollm2_ckpt, hf_gguf_tokenizer):
    ck, hf = smollm2_ckpt, hf_gguf_tokenizer
    for label, conv, agp in _cases("smollm2-135m-instruct"):
        want = hf.apply_chat_template(_for_hf(conv), tokenize=False, add_generation_prompt=agp)
        got = render_chat(ck.chat_template, conv, add_generation_prompt=agp,
                          special_tokens=ck.special_tokens)
        assert got == want, (label, agp)
        want_ids = hf.apply_chat_template(_for_hf(conv), tokenize=True, return_dict=False,
                                          add_generation_prompt=agp)
        assert chat_ids(ck.tokenizer, got) == want_ids, (label, agp)
        assert chat_prompt_ids(ck, conv, add_generation_prompt=agp) == want_ids
