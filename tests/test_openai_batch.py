"""OpenAI Batch API files, the parsing and formatting rules on their own (no model): request
lines and their per-line errors, the format and model-name rules, context caps and seeds,
response and error lines, resume keys. Through `flexrun generate`: test_openai_batch_cli.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from conftest import write_jsonl
from flexrun.config import FlexrunError, SamplingParams
from flexrun.jobs import (Pieces, Request, calls, derived_seed, detect_format, error_line,
                          finished_ids, model_names, read_job, read_openai, response_line)
from flexrun.jobs.fields import JobItem, LineError
from flexrun.jobs.prepare import model_matches, openai_request
from openai_rows import CHAT, COMPLETIONS, req, user, write_lines


# ---- reading request lines ---------------------------------------------------------------------
def test_request_lines_and_their_errors(tmp_path):
    rows = [req("ok", messages=user("hi"), max_completion_tokens=5, n=2, stop="x", seed=3,
                logprobs=True, top_logprobs=2, user="u1", metadata={"k": "v"},
                frequency_penalty=0, stream=False, response_format=None),
            req("tools", messages=user("hi"), tools=[{"type": "function"}], tool_choice="auto"),
            '{"custom_id": "torn", "body": {',
            req("get", messages=user("hi")) | {"method": "GET"},
            req("emb", url="/v1/embeddings", input="hi"),
            req("cmp", url=COMPLETIONS, prompt="once upon", logprobs=3, top_p=0),
            req("ids", url=COMPLETIONS, prompt=[5, 6, 7]),
            {"method": "POST", "url": CHAT, "body": {}},
            req("neg", messages=user("hi"), n=0),
            req("img", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "x"}}]}]),
            req("toplp", messages=user("hi"), top_logprobs=2),
            req("pen", messages=user("hi"), presence_penalty=0.5),
            {"custom_id": "bare", "body": {"prompt": "x"}},           # POST /v1/completions
            req("stream", messages=user("hi"), stream=True)]
    items = {it.id: it for it in read_openai(write_lines(tmp_path / "in.jsonl", rows))}
    ok = items["ok"]
    assert ok.error is None and ok.endpoint == "chat" and ok.model == "opt"
    assert ok.options == {"max_tokens": 5, "n": 2, "stop": ["x"], "seed": 3, "logprobs": True,
                          "top_logprobs": 2, "temperature": 1.0, "top_p": 1.0}
    assert ok.messages == user("hi")
    err = {k: (it.error.code, it.error.message) for k, it in items.items() if it.error}
    assert err["tools"][0] == "unsupported_parameter"
    assert '"tools", "tool_choice" are not supported' in err["tools"][1]
    assert err[3][0] == "invalid_json" and "line 3" in err[3][1]      # keyed by line number
    assert err["get"][0] == "invalid_method"
    assert err["emb"][0] == "invalid_url" and "/v1/embeddings" in err["emb"][1]
    assert err[8][0] == "missing_required_parameter" and "custom_id" in err[8][1]
    assert err["neg"][0] == "invalid_value" and "n must be >= 1" in err["neg"][1]
    assert err["img"][0] == "invalid_value" and "image_url" in err["img"][1]
    assert "top_logprobs needs logprobs" in err["toplp"][1]
    assert err["pen"] == ("unsupported_parameter", '"presence_penalty" is not supported by '
                          "flexrun (/v1/chat/completions): remove it from the body")
    cmp = items["cmp"]          # completions: logprobs k -> top k; top_p 0 -> greedy; 16 tokens
    assert cmp.error is None and cmp.prompt == "once upon"
    assert cmp.options == {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0,
                           "logprobs": True, "top_logprobs": 3}
    assert items["ids"].input_ids == [5, 6, 7]
    assert items["bare"].endpoint == "completions" and items["bare"].model is None
    assert err["stream"][0] == "unsupported_parameter" and '"stream"' in err["stream"][1]
    assert set(err) == {"tools", 3, "get", "emb", 8, "neg", "img", "toplp", "pen", "stream"}


def test_duplicate_custom_id_stops_before_loading(tmp_path):
    p = write_lines(tmp_path / "in.jsonl", [req("a", messages=user("x")),
                                           req("a", messages=user("y"))])
    with pytest.raises(FlexrunError, match="line 2: duplicate custom_id 'a' .also on line 1"):
        read_openai(p)


def test_format_is_detected_from_the_first_line(tmp_path):
    o = write_lines(tmp_path / "o.jsonl", ["", req("a", messages=user("x")), "{bad"])
    p = write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "prompt": "x"}])
    assert detect_format(o) == "openai" and detect_format(p) == "plain"
    assert read_job(o)[0] == "openai" and read_job(p, "auto")[0] == "plain"
    with pytest.raises(FlexrunError, match="malformed JSON"):
        read_job(write_lines(tmp_path / "b.jsonl", ["{bad", req("a", messages=user("x"))]))


def test_model_name_rule():
    names = model_names("/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    for ok in ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
               "smollm2-135m-instruct.q4_1.gguf", "/models/SmolLM2-135M-Instruct.Q4_1.gguf"):
        assert model_matches(ok, names), ok
    for bad in ("gpt-4o", "SmolLM2-360M-Instruct", "models"):
        assert not model_matches(bad, names), bad
    assert model_matches("smollm2", model_names("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert model_matches("opt", model_names("/tmp/x/opt", "opt"))


# ---- requests for a model (a fake one) ----------------------------------------------------------
class FakeTokenizer:
    decoder = None

    def encode(self, text, add_special_tokens=True):
        return SimpleNamespace(ids=[3 + ord(c) % 100 for c in text])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


FAKE = SimpleNamespace(spec=SimpleNamespace(max_positions=64, vocab_size=120, name="opt"),
                       tokenizer=FakeTokenizer(),
                       chat_prompt_ids=lambda m, chat_template=None: [1] * (4 * len(m)))


def _prepared(body: dict, url=COMPLETIONS, mnt=None, truncate=False, seed=None):
    it = read_openai_one(req("r", url=url, **body))
    return openai_request(it, FAKE, model_names("opt", "opt"), mnt, seed, None, truncate)


def read_openai_one(row) -> JobItem:
    from flexrun.jobs.openai import _request
    it = _request(1, json.dumps(row))
    assert it.error is None, it.error.message
    return it


def test_caps_context_and_seeds():
    r = _prepared({"prompt": "abcd"})                       # completions default: 16
    assert (r.cap, r.length, r.params.max_tokens) == (16, 4, 16)
    r = _prepared({"messages": user("x")}, url=CHAT)        # chat default: up to the context
    assert r.cap == 64 - 4 and r.prompt == [1] * 4
    assert _prepared({"messages": user("x")}, url=CHAT, mnt=10).cap == 10
    assert _prepared({"prompt": "ab", "max_tokens": 50}, mnt=10).cap == 10
    with pytest.raises(LineError) as e:
        _prepared({"prompt": "a" * 60, "max_tokens": 10})
    assert e.value.code == "context_length_exceeded" and "60 tokens" in e.value.message
    r = _prepared({"prompt": "abcdefgh" * 8, "max_tokens": 10}, truncate=True)
    assert r.length == 54 and r.prompt == FAKE.tokenizer.encode("abcdefgh" * 8).ids[10:]
    with pytest.raises(LineError, match="outside the vocabulary"):
        _prepared({"prompt": [5, 500]})
    with pytest.raises(LineError) as e:
        _prepared({"prompt": "x", "model": "llama"})
    assert e.value.code == "model_not_found"
    # a seed: the request's own; else one derived from --seed and the custom_id; else none
    assert _prepared({"prompt": "x", "seed": 5}, seed=7).params.seed == 5
    assert _prepared({"prompt": "x"}, seed=7).params.seed == derived_seed(7, "r") \
        != derived_seed(7, "s")
    assert _prepared({"prompt": "x"}).params.seed is None


def test_calls_fit_the_positions():
    def r(cap, length, line):
        return Request(JobItem(line, line=line), [1] * (length or 1), SamplingParams(), cap,
                       length)
    reqs = [r(50, 10, 1), r(8, 60, 2), r(8, 5, 3), r(20, None, 4), r(20, None, 5),
            r(30, 40, 6)]
    got = [(m, [x.item.line for x in g]) for m, g in calls(reqs, 64)]
    # a call of 50 new tokens takes prompts of <= 14 tokens (3 joins 1); unknown lengths
    # (text) go to the call of their own cap; the 60-token prompt needs a call of <= 4 ... 8
    assert got == [(50, [1, 3]), (30, [6]), (20, [4, 5]), (8, [2])]


# ---- output lines -----------------------------------------------------------------------------
def _out(samples, prompt=(1, 2, 3)):
    from flexrun.api import RequestOutput
    s0 = samples[0]
    return RequestOutput(0, list(prompt), s0.output_ids, s0.text, s0.finish_reason, samples)


def test_response_and_error_lines():
    from flexrun import Sample, TokenLogprob
    pieces = Pieces(FakeTokenizer())
    lp = [TokenLogprob(4, -0.5, [(4, -0.5), (7, -1.5)]), TokenLogprob(9, -0.25, [(9, -0.25)])]
    out = _out([Sample([4, 9], "ej", "stop", lp), Sample([5], "f", "length", None)])
    it = JobItem("c1", endpoint="chat")
    line = response_line(it, out, "opt", pieces)
    assert line["custom_id"] == "c1" and line["error"] is None
    assert line["id"].startswith("batch_req_")
    resp = line["response"]
    assert resp["status_code"] == 200 and resp["request_id"]
    body = resp["body"]
    assert body["object"] == "chat.completion" and body["model"] == "opt"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    c0, c1 = body["choices"]
    assert c0["message"] == {"role": "assistant", "content": "ej", "refusal": None}
    assert c0["finish_reason"] == "stop" and c1["finish_reason"] == "length"
    assert c0["logprobs"]["content"][0] == {
        "token": "e", "logprob": -0.5, "bytes": [101],
        "top_logprobs": [{"token": "e", "logprob": -0.5, "bytes": [101]},
                         {"token": "h", "logprob": -1.5, "bytes": [104]}]}
    assert c1["logprobs"] is None and c1["index"] == 1
    cmp = response_line(JobItem("c2", endpoint="completions"), out, "opt", pieces)["response"]
    ch = cmp["body"]["choices"][0]
    assert cmp["body"]["object"] == "text_completion" and ch["text"] == "ej"
    assert ch["logprobs"] == {"tokens": ["e", "j"], "token_logprobs": [-0.5, -0.25],
                              "top_logprobs": [{"e": -0.5, "h": -1.5}, {"j": -0.25}],
                              "text_offset": [0, 1]}
    err = error_line(JobItem(7), LineError("invalid_json", "line 7: bad"))
    assert err["custom_id"] == 7 and err["response"] is None
    assert err["error"] == {"code": "invalid_json", "message": "line 7: bad"}


def test_byte_level_pieces_keep_raw_bytes(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    ids = tok.encode("é").ids                         # two byte tokens
    p = Pieces(tok)
    assert len(ids) == 2 and [p.raw(i) for i in ids] == [[0xC3], [0xA9]]
    assert bytes(sum((p.raw(i) for i in ids), [])).decode() == "é"


def test_resume_keys_are_custom_ids(tmp_path):
    out = write_lines(tmp_path / "out.jsonl", [
        error_line(JobItem("a"), LineError("x", "y")), error_line(JobItem(3), LineError("x", "y")),
        {"id": "p1", "output_ids": [], "text": "", "finish_reason": "length"}])
    assert finished_ids(out) == {'"a"', "3", '"p1"'}
