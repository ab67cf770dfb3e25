"""Chat templates: render a conversation into a prompt exactly as transformers'
`apply_chat_template` does, read a template file, and encode the prompt.

The Jinja environment is the one transformers builds (transformers/utils/chat_template_utils.py,
`_compile_jinja_template`): an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks,
the loopcontrols extension and the `{% generation %}` tag, the `raise_exception` and
`strftime_now` globals, the guarded `namespace` and `dict`, and a `tojson` filter that does not
escape HTML. The template sees `messages`, `add_generation_prompt`, `tools` and `documents`
(None), the tokenizer's special tokens (`bos_token`, `eos_token`, ...) and any extra variables
(e.g. `enable_thinking=False` for Qwen3, `date_string` for Llama 3.1).

Messages are `{"role": str, "content": str | [{"type": "text", "text": str}, ...]}`. A template
that loops over a message's content (the OpenAI format) gets the parts as they are; a template
that treats content as a string gets the text parts joined by newlines (as vLLM does), where
transformers would hand it the list and the template would fail or print the list.

The prompt is encoded without the tokenizer's own added special tokens: the template writes
them itself (transformers' `apply_chat_template(tokenize=True)` encodes with
add_special_tokens=False).
"""
from __future__ import annotations

import functools
import json
from contextlib import suppress
from datetime import datetime
from pathlib import Path

from flexrun.config import FlexrunError

# the named special tokens transformers hands a template (PreTrainedTokenizerBase's
# SPECIAL_TOKENS_ATTRIBUTES), in its order
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
# names a message's reasoning is passed under; the first is the one templates read
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def no_template_error(source: str) -> FlexrunError:
    """The error for a model without a chat template."""
    return FlexrunError(f"{source} has no chat template: pass --chat-template FILE")


# ---- the Jinja environment ------------------------------------------------------------------
class _Raised(Exception):
    """What a template's raise_exception("...") raises (turned into a FlexrunError)."""


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    """The template compiled in transformers' sandboxed environment (cached by text)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it
        (for its assistant-token masks); rendering keeps the body as it is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """transformers' namespace: no underscore-prefixed attributes."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes ({name!r}) "
                    "on a namespace")

    class Dict:
        """transformers' `dict` global: a constructor without attribute access to the type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise _Raised(str(message))

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=Dict(), namespace=Namespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise FlexrunError(f"the chat template is not valid Jinja: {e.message} "
                           f"(line {e.lineno})") from None


# ---- content format: does the template loop over a message's content? -----------------------
def _refers_to(node, names: set[str]) -> bool:
    """Whether an expression is one of `names`, an item/attribute/slice of one, or a filter or
    test applied to one (`messages[1:]`, `messages | selectattr(...)`)."""
    import jinja2.nodes as n
    while True:
        if isinstance(node, n.Name):
            return node.name in names
        if isinstance(node, (n.Getitem, n.Getattr, n.Filter, n.Test)) and node.node is not None:
            node = node.node
        else:
            return False


def _content_of(node, message_vars: set[str]) -> bool:
    """Whether an expression reads the content of a message (`message['content']`,
    `message.content`, `messages[0]['content']`, possibly filtered)."""
    import jinja2.nodes as n
    while isinstance(node, (n.Filter, n.Test)) and node.node is not None:
        node = node.node
    if isinstance(node, n.Getitem) and isinstance(node.arg, n.Const):
        key, base = node.arg.value, node.node
    elif isinstance(node, n.Getattr):
        key, base = node.attr, node.node
    else:
        return False
    return key == "content" and _refers_to(base, message_vars)


def _targets(node) -> set[str]:
    import jinja2.nodes as n
    return {t.name for t in node.find_all(n.Name) if t.ctx == "store"} | (
        {node.name} if isinstance(node, n.Name) else set())


@functools.lru_cache(maxsize=32)
def content_format(template: str) -> str:
    """"openai" when the template iterates over a message's content (a list of parts), else
    "string" (vLLM's detection, on the template's syntax tree)."""
    import jinja2.nodes as n
    ast = _compile(template).environment.parse(template)
    lists = {"messages"}                      # the conversation and its aliases
    for _ in range(3):                        # aliases of aliases
        for a in ast.find_all(n.Assign):
            if _refers_to(a.node, lists):
                lists |= _targets(a.target)
    message_vars = set(lists)                 # loop variables over messages, and `message`
    for f in ast.find_all(n.For):
        if _refers_to(f.iter, lists):
            message_vars |= _targets(f.target)
    contents = set()                          # names bound to a message's content
    for a in ast.find_all(n.Assign):
        if _content_of(a.node, message_vars):
            contents |= _targets(a.target)
    for f in ast.find_all(n.For):
        if _content_of(f.iter, message_vars) or _refers_to(f.iter, contents):
            return "openai"
    return "string"


# ---- messages -------------------------------------------------------------------------------
def _plain(value, where: str):
    """A copy of `value` made of JSON types only (what a template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise FlexrunError(f"{where}: keys must be strings, got {k!r}")
            out[k] = _plain(v, where)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise FlexrunError(f"{where}: {type(value).__name__} values are not allowed "
                       "(use strings, numbers, booleans, lists and objects)")


def _check_parts(parts: list, where: str) -> list[dict]:
    if not parts:
        raise FlexrunError(f"{where}: \"content\" is an empty list: give a string or "
                           "[{\"type\": \"text\", \"text\": ...}] parts")
    for j, part in enumerate(parts):
        at = f"{where}: content part {j}"
        if not isinstance(part, dict):
            raise FlexrunError(f"{at} must be an object {{\"type\": \"text\", \"text\": ...}}, "
                               f"got {type(part).__name__}")
        kind = part.get("type", "text" if "text" in part else None)
        if kind != "text":
            raise FlexrunError(f"{at} has type {kind!r}: only \"text\" parts are supported "
                               "(flexrun models read text only)")
        if not isinstance(part.get("text"), str):
            raise FlexrunError(f"{at} needs a string \"text\"")
    return parts


def check_messages(messages) -> list[dict]:
    """Validate one conversation; return a plain copy (keys whose value is None dropped, as
    transformers drops them). Raises FlexrunError naming the first problem."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, (list, tuple)):
        raise FlexrunError("messages must be a list of {\"role\": ..., \"content\": ...} "
                           f"objects, got {type(messages).__name__}")
    if not messages:
        raise FlexrunError("messages is empty: a conversation needs at least one message")
    out = []
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise FlexrunError(f"{where} must be an object with \"role\" and \"content\", got "
                               f"{type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise FlexrunError(f"{where} needs a \"role\" string (system, user, assistant...)")
        if content is None:
            raise FlexrunError(f"{where} ({role}) has no \"content\"")
        if isinstance(content, list):
            _check_parts(content, where)
        elif not isinstance(content, str):
            raise FlexrunError(f"{where} ({role}): \"content\" must be a string or a list of "
                               f"{{\"type\": \"text\", \"text\": ...}} parts, got "
                               f"{type(content).__name__}")
        m = _plain(m, where)
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:             # as transformers aliases them
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _for_template(messages: list[dict], fmt: str) -> list[dict]:
    """Content parts as the template reads them: kept for an "openai" template, joined into one
    string for a "string" one."""
    if fmt == "openai":
        return messages
    return [{**m, "content": "\n".join(p["text"] for p in m["content"])}
            if isinstance(m["content"], list) else m for m in messages]


# ---- rendering ------------------------------------------------------------------------------
def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                special_tokens: dict[str, str] | None = None, **extra) -> str:
    """The prompt text of one conversation, as transformers' apply_chat_template(
    tokenize=False) renders it. `special_tokens` are the tokenizer's named special tokens
    (Checkpoint.special_tokens); `extra` are further template variables (`tools`, `documents`,
    `enable_thinking`, `date_string`, ...), which override special tokens of the same name."""
    import jinja2
    if not isinstance(template, str) or not template.strip():
        raise FlexrunError("the chat template is empty")
    compiled = _compile(template)
    chat = _for_template(check_messages(messages), content_format(template))
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(_plain(extra, "chat template variables"))
    tools, documents = variables.pop("tools", None), variables.pop("documents", None)
    try:
        return compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=bool(add_generation_prompt), **variables)
    except _Raised as e:
        raise FlexrunError(f"the chat template rejects this conversation: {e}") from None
    except jinja2.TemplateError as e:
        raise FlexrunError(f"the chat template failed on this conversation "
                           f"({type(e).__name__}: {e})") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise FlexrunError(f"the chat template failed on this conversation "
                           f"({type(e).__name__}: {e}); check the messages' roles and "
                           "content") from None


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt, encoded WITHOUT the tokenizer's post-processor special
    tokens (the template wrote BOS etc. itself). `tokenizer`: a tokenizers.Tokenizer (or
    anything with encode(text, add_special_tokens=...))."""
    if tokenizer is None:
        raise FlexrunError("this model has no tokenizer: chat prompts need one")
    enc = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(enc, "ids", enc))


# ---- where templates come from --------------------------------------------------------------
def pick_named(template, where: str) -> str | None:
    """A tokenizer_config "chat_template": a string, or a list of {"name", "template"} (the one
    named "default" is used, as transformers does without tools)."""
    if template is None or isinstance(template, str):
        return template or None
    if isinstance(template, dict):               # already {name: template}
        named = template
    elif isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    else:
        raise FlexrunError(f"{where}: \"chat_template\" must be a string or a list of "
                           "{\"name\", \"template\"} objects")
    if "default" not in named:
        raise FlexrunError(f"{where} has chat templates {sorted(map(str, named))} but none "
                           "named \"default\": pass --chat-template FILE")
    return named["default"] or None


def load_template(path) -> str:
    """The template text of a --chat-template FILE: a .jinja (any text) file, or a JSON file
    with a "chat_template" key (a tokenizer_config.json)."""
    p = Path(path)
    if not p.is_file():
        raise FlexrunError(f"chat template file {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FlexrunError(f"cannot read chat template file {p} ({e})") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FlexrunError(f"{p} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict) or "chat_template" not in data:
            raise FlexrunError(f"{p} has no \"chat_template\" key: pass a .jinja file or a "
                               "tokenizer_config.json that holds a template")
        text = pick_named(data["chat_template"], str(p)) or ""
    if not text.strip():
        raise FlexrunError(f"chat template file {p} is empty")
    _compile(text)                                 # fail now on a syntax error
    return text


def resolve_template(override: str | None, model_template: str | None, source: str) -> str:
    """The template to use: `override` (template text, or the path of a .jinja/.json file) if
    given, else the model's own; FlexrunError when there is none."""
    if override is not None:
        if "{{" in override or "{%" in override:
            return override
        with suppress(OSError, ValueError):
            if Path(override).is_file():
                return load_template(override)
        raise FlexrunError("chat_template is neither a Jinja template nor an existing file: "
                           f"{override[:60]!r}")
    if not model_template:
        raise no_template_error(source)
    return model_template


def chat_prompt_ids(checkpoint, messages: list[dict], *, chat_template: str | None = None,
                    add_generation_prompt: bool = True, **extra) -> list[int]:
    """A conversation's prompt token ids for a Checkpoint: its template (or chat_template),
    its special tokens, its tokenizer."""
    template = resolve_template(chat_template, checkpoint.chat_template, checkpoint.source)
    text = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       special_tokens=checkpoint.special_tokens, **extra)
    if checkpoint.tokenizer is None:
        raise FlexrunError(f"{checkpoint.source} has no tokenizer: chat prompts need one")
    return chat_ids(checkpoint.tokenizer, text)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FlexrunError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return data if isinstance(data, dict) else {}


def hf_chat_config(d: Path) -> tuple[str | None, dict[str, str]]:
    """(chat template, special tokens) of an HF checkpoint directory, as transformers reads
    them: chat_template.jinja (or chat_templates/default.jinja) before tokenizer_config.json's
    "chat_template"; special tokens from tokenizer_config.json, then special_tokens_map.json."""
    d = Path(d)
    cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() \
        else {}
    template = None
    for f in (d / "chat_template.jinja", d / "chat_templates" / "default.jinja"):
        if f.is_file():
            template = f.read_text(encoding="utf-8") or None
            break
    if template is None:
        template = pick_named(cfg.get("chat_template"), str(d / "tokenizer_config.json"))
    smap = d / "special_tokens_map.json"
    fallback = _read_json(smap) if smap.is_file() else {}
    specials = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(cfg.get(name)) or _token_text(fallback.get(name))
        if text is not None:
            specials[name] = text
    return template, specials
