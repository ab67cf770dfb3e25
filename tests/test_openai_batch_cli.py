"""OpenAI Batch API files through `flexrun generate` on the tiny OPT model: request lines in,
batch output lines out, resume on custom_id, logprobs against transformers, stop strings
across token boundaries, a chat job without a template."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexrun.cli import main
from flexrun.config import SamplingParams
from flexrun.jobs import Pieces, derived_seed
from conftest import same_to_fp32
from openai_rows import COMPLETIONS, TEMPLATE, req, user, write_lines


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
            # redone in a batch of other rows: logprobs may round their last bit differently
            assert same_to_fp32(b["choices"], a["choices"]) and a["usage"] == b["usage"], k
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
