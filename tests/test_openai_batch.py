"""OpenAI Batch API files through `flexrun generate`: request lines in, batch output lines out,
per-line errors, resume on custom_id, logprobs against transformers, stop strings across
token boundaries; and the parsing / formatting rules on their own (no model)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import write_jsonl
from flexrun.cli import main
from flexrun.config import FlexrunError, SamplingParams
from flexrun.jobs import (Pieces, Request, calls, derived_seed, detect_format, error_line,
                          finished_ids, model_names, read_job, read_openai, response_line)
from flexrun.jobs.fields import JobItem, LineError
from flexrun.jobs.prepare import model_matches, openai_request

TEMPLATE = Path(__file__).parent / "data" / "chatml.jinja"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def req(cid: str, url: str = CHAT, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "opt", **body}}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


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


# ---- through the CLI, on the tiny OPT model ---------------------------------------------------
SEED = 7
PROMPTS = ["the quick brown fox", "hello world, this is flexrun", "offloading weights to disk",
           "a b c d e f g 0 1 2 3"]


@pytest.fixture(scope="module")
def llm(opt_dir):
    from flexrun import LLM
    with LLM(str(opt_dir), device="cpu", policy="resident") as m:
        yield m


@pytest.fixture(scope="module")
def hf_logprobs(opt_dir):
    """ids -> log-softmax of transformers' logits at every position."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(opt_dir), dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1)
    return run


def batch_rows() -> list:
    """20 request lines: n 1..3, stop strings, logprobs, seeds or none, greedy or sampled, one
    unsupported field, one other model, one malformed line, one /v1/completions request."""
    rows = []
    for i in range(20):
        msgs = [{"role": "system", "content": "answer briefly"}] * (i % 2)
        body = {"messages": msgs + user(f"{PROMPTS[i % 4]} #{i}"), "max_tokens": 3 + i % 4}
        if i % 3 == 0:
            body["n"] = 2 + i % 2
        if i % 4 == 1:
            body |= {"logprobs": True, "top_logprobs": 3}
        if i % 5 == 2:
            body["stop"] = ["\n\n", "ab"]
        if i % 2 == 0:
            body["seed"] = 1000 + i
        if i % 6 == 4:
            body["temperature"] = 0
        if i == 11:
            body |= {"user": "someone", "metadata": {"batch": "7"}, "top_p": 0.9}
        rows.append(req(f"r{i:02d}", **body))
    rows[5]["body"]["response_format"] = {"type": "json_object"}
    rows[9]["body"]["model"] = "gpt-4o-mini"
    rows[13] = json.dumps(rows[13])[:-9]
    rows[17] = req("r17", url=COMPLETIONS, prompt="the quick brown fox", max_tokens=4,
                   logprobs=2, n=2)
    return rows


def run_job(inp: Path, out: Path, opt_dir, *extra: str) -> int:
    return main(["generate", "--model", str(opt_dir), "--input", str(inp), "--output", str(out),
                 "--device", "cpu", "--quiet", "--chat-template", str(TEMPLATE), *extra])


def lines_by_key(out: Path) -> dict:
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    keys = [r["custom_id"] for r in rows]
    assert len(keys) == len(set(keys)), "a custom_id twice"
    return dict(zip(keys, rows))


def expected(llm, row: dict):
    """The request run on its own through the Python API (its seed: its own, else derived
    from --seed and the custom_id)."""
    body, cid = row["body"], row["custom_id"]
    if "messages" in body:
        ids = llm.chat_prompt_ids(body["messages"], chat_template=TEMPLATE.read_text())
        lp = {"logprobs": body.get("logprobs", False), "top_logprobs": body.get("top_logprobs", 0)}
    else:
        ids = llm.tokenizer.encode(body["prompt"]).ids
        lp = {"logprobs": "logprobs" in body, "top_logprobs": body.get("logprobs", 0)}
    temp, top_p = body.get("temperature", 1.0), body.get("top_p", 1.0)
    p = SamplingParams(temperature=temp, top_p=top_p, n=body.get("n", 1),
                       stop=body.get("stop", []), max_tokens=body["max_tokens"],
                       seed=body.get("seed", derived_seed(SEED, cid)), **lp)
    return ids, llm.generate([ids], max_new_tokens=body["max_tokens"], sampling=p)[0]


def check_logprobs(entries: list[dict], prompt: list[int], out_ids: list[int], k: int, llm,
                   hf_logprobs) -> None:
    """Each token's logprob and top k are transformers' log-softmax, within 1e-4."""
    lsm = hf_logprobs(prompt + out_ids)
    pieces = Pieces(llm.tokenizer)
    assert len(entries) == len(out_ids)
    for n, (e, t) in enumerate(zip(entries, out_ids)):
        row = lsm[len(prompt) - 1 + n]
        assert e["token"] == pieces.piece(t) and e["bytes"] == pieces.raw(t)
        assert abs(e["logprob"] - row[t].item()) < 1e-4
        top = torch.topk(row, k)
        assert [x["logprob"] for x in e["top_logprobs"]] == pytest.approx(
            top.values.tolist(), abs=1e-4)
        assert e["top_logprobs"][0]["token"] == pieces.piece(int(top.indices[0]))


def test_openai_batch_round_trip_and_resume(tmp_path, opt_dir, llm, hf_logprobs):
    rows = batch_rows()
    inp, out = write_lines(tmp_path / "batch.jsonl", rows), tmp_path / "results.jsonl"
    assert run_job(inp, out, opt_dir, "--seed", str(SEED)) == 0
    got = lines_by_key(out)
    keys = [f"r{i:02d}" for i in range(20)]
    keys[13] = 14                                       # the malformed line: its line number
    assert list(got) == keys                            # each once, in the input's order
    assert got["r05"]["error"]["code"] == "unsupported_parameter"
    assert '"response_format"' in got["r05"]["error"]["message"]
    assert got["r09"]["error"]["code"] == "model_not_found"
    assert "gpt-4o-mini" in got["r09"]["error"]["message"]
    assert got[14]["error"]["code"] == "invalid_json" and got[14]["response"] is None
    for row in rows:
        if isinstance(row, str) or row["custom_id"] in ("r05", "r09"):
            continue
        line = got[row["custom_id"]]
        assert line["error"] is None and line["response"]["status_code"] == 200
        body, want = line["response"]["body"], row["body"]
        prompt, exp = expected(llm, row)
        chat = "messages" in want
        assert body["object"] == ("chat.completion" if chat else "text_completion")
        assert len(body["choices"]) == want.get("n", 1)
        completion = sum(len(s.output_ids) for s in exp.samples)
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": completion,
                                 "total_tokens": len(prompt) + completion}
        for c, s in zip(body["choices"], exp.samples):
            assert (c["message"]["content"] if chat else c["text"]) == s.text
            assert c["finish_reason"] == s.finish_reason
            if chat and want.get("logprobs"):
                check_logprobs(c["logprobs"]["content"], prompt, s.output_ids,
                               want["top_logprobs"], llm, hf_logprobs)
            elif not chat:
                lp = c["logprobs"]
                assert lp["tokens"] == [Pieces(llm.tokenizer).piece(t) for t in s.output_ids]
                lsm = hf_logprobs(prompt + s.output_ids)
                assert lp["token_logprobs"] == pytest.approx(
                    [lsm[len(prompt) - 1 + n, t].item() for n, t in enumerate(s.output_ids)],
                    abs=1e-4)
            else:
                assert c["logprobs"] is None
    # resume: lines lost (seeded and unseeded requests, an error line kept), the last one torn
    before = out.read_text().splitlines(keepends=True)
    lost = {"r00", "r01", "r03", "r19"}
    kept = [ln for ln in before if json.loads(ln)["custom_id"] not in lost]
    out.write_text("".join(kept[:-1]) + kept[-1][:40])
    assert run_job(inp, out, opt_dir, "--seed", str(SEED)) == 0
    again = lines_by_key(out)
    assert list(again) == keys
    for k in keys:
        if k in lost or k == json.loads(kept[-1])["custom_id"]:
            a, b = got[k]["response"]["body"], again[k]["response"]["body"]
            assert a["choices"] == b["choices"] and a["usage"] == b["usage"], k
        else:
            assert again[k] == got[k]                   # untouched, errors included
    assert run_job(inp, out, opt_dir, "--seed", str(SEED)) == 0       # nothing left to do
    assert lines_by_key(out) == again


def test_stop_string_across_two_tokens(tmp_path, opt_dir, llm):
    """A stop string made of the end of one token and the start of the next: the output ends
    right before it, and generation stops at the token that completed it. (The tiny model's
    greedy text repeats one token: seeded samples, the same in any batch, have variety.)"""
    pieces = Pieces(llm.tokenizer)
    prompt, found = PROMPTS[0], None
    for seed in range(40):
        p = SamplingParams(temperature=1.0, seed=seed)
        ids = llm.generate([prompt], max_new_tokens=16, sampling=p)[0].output_ids
        text = llm.tokenizer.decode(ids)
        for k in range(1, len(ids)):
            a, b = pieces.piece(ids[k - 1]), pieces.piece(ids[k])
            if not (a.isascii() and b.isascii() and a.strip() and b.strip()):
                continue
            head, stop = llm.tokenizer.decode(ids[:k]), a[-1] + b[0]
            if head.endswith(a) and text.find(stop) == len(head) - 1:
                found = seed, stop, head[:-1], k + 1
                break
        if found:
            break
    assert found, "no sample with two printable tokens in a row"
    seed, stop, before_stop, n_ids = found
    common = dict(url=COMPLETIONS, prompt=prompt, max_tokens=16, seed=seed)
    inp = write_lines(tmp_path / "in.jsonl", [req("s", stop=[stop], **common),
                                              req("t", **common)])
    out = tmp_path / "out.jsonl"
    assert run_job(inp, out, opt_dir) == 0
    got = lines_by_key(out)
    c = got["s"]["response"]["body"]["choices"][0]
    assert c["text"] == before_stop and c["finish_reason"] == "stop"
    assert got["s"]["response"]["body"]["usage"]["completion_tokens"] == n_ids
    assert got["t"]["response"]["body"]["choices"][0]["text"].startswith(before_stop + stop)


def test_chat_without_a_template_stops_the_job(tmp_path, opt_dir, capsys):
    inp = write_lines(tmp_path / "in.jsonl", [req("a", messages=user("hi"))])
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", str(opt_dir), "--input", str(inp), "--output", str(out),
               "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("flexrun: error: ") and "--chat-template" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()      # before the model loads
