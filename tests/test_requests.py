"""Per-request generation settings: n samples sharing one prefill, per-request seeds and token
caps, stop strings across token boundaries, logprobs / top_logprobs and prompt_logprobs
against log-softmax of the model's logits (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from conftest import ragged_prompts
from flexrun import LLM, Policy, SamplingParams

GREEDY = SamplingParams(ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(str(llama_dir), device="cpu", policy=Policy(gpu_batch_size=16)) as m:
        yield m


def test_n_samples_share_one_prefill(llm):
    prompts = ragged_prompts(4)
    sp = SamplingParams(temperature=0.8, seed=7, n=3, ignore_eos=True)
    llm.stats = type(llm.stats)()
    outs = llm.generate(prompts, 10, sp)
    assert llm.stats.prefill_rows == 4                 # one prefill per prompt, not 12
    assert all(len(o.samples) == 3 and o.output_ids == o.samples[0].output_ids for o in outs)
    assert any(len({tuple(s.output_ids) for s in o.samples}) > 1 for o in outs)
    llm.share_prefill = False                          # every row prefilled on its own
    try:
        plain = llm.generate(prompts, 10, sp)
    finally:
        llm.share_prefill = True
    assert [[s.output_ids for s in o.samples] for o in outs] == \
        [[s.output_ids for s in o.samples] for o in plain]


def test_seeded_samples_do_not_depend_on_the_batch(llama_dir, llm):
    prompts = ragged_prompts(5)
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=3, n=2, ignore_eos=True)
    together = llm.generate(prompts, 8, sp)
    with LLM(str(llama_dir), device="cpu", policy=Policy(gpu_batch_size=1,
                                                          num_gpu_batches=2)) as other:
        alone = other.generate(prompts[2:3], 8, sp)
    assert [s.output_ids for s in alone[0].samples] == \
        [s.output_ids for s in together[2].samples]


def test_per_request_caps_and_reasons(llm):
    prompts = ragged_prompts(3)
    free = llm.generate(prompts, 8, GREEDY)
    stop_tok = free[1].output_ids[2]
    params = [SamplingParams(ignore_eos=True, max_tokens=3),
              SamplingParams(ignore_eos=True, stop_token_ids=[stop_tok]),
              SamplingParams(ignore_eos=True)]
    outs = llm.generate(prompts, 8, params)
    assert outs[0].output_ids == free[0].output_ids[:3] and outs[0].finish_reason == "length"
    cut = free[1].output_ids.index(stop_tok) + 1
    assert outs[1].output_ids == free[1].output_ids[:cut] and outs[1].finish_reason == "stop"
    assert outs[2].output_ids == free[2].output_ids and outs[2].finish_reason == "length"


def test_stop_string_across_two_tokens(llm):
    prompt = ragged_prompts(1, seed=4)[0]
    free = llm.generate([prompt], 16, GREEDY)[0]
    text = [llm.decode(free.output_ids[:k]) for k in range(len(free.output_ids) + 1)]
    # the last character of token k-1's text and the first of token k's: token k completes it
    k, stop = next((k, text[k + 1][len(text[k]) - 1:len(text[k]) + 1])
                   for k in range(1, len(text) - 1)
                   if len(text[k]) > len(text[k - 1]) and len(text[k + 1]) > len(text[k])
                   and text[k + 1][len(text[k]) - 1:len(text[k]) + 1] not in text[k])
    out = llm.generate([prompt], 16, SamplingParams(ignore_eos=True, stop=[stop]))[0]
    assert out.output_ids == free.output_ids[:k + 1] and out.finish_reason == "stop"
    assert out.text == text[k + 1][:text[k + 1].index(stop)]


def test_logprobs_are_log_softmax_of_the_logits(llm):
    prompts = ragged_prompts(3, seed=6)
    sp = SamplingParams(ignore_eos=True, logprobs=True, top_logprobs=5)
    outs = llm.generate(prompts, 6, sp)
    for p, o in zip(prompts, outs):
        full = llm.prompt_logits([p + o.output_ids[:-1]])[0]
        lp = torch.log_softmax(full[len(p) - 1:].double(), -1)
        for t, (tok, got) in enumerate(zip(o.output_ids, o.samples[0].logprobs)):
            assert got.token_id == tok
            assert abs(got.logprob - float(lp[t, tok])) < 1e-4
            want = lp[t].topk(5)
            assert [i for i, _ in got.top] == want.indices.tolist()
            assert max(abs(a - b) for (_, a), b in zip(got.top, want.values.tolist())) < 1e-4


def test_prompt_logprobs_in_chunks(llm):
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (150, 7, 70)]
    outs = llm.generate(prompts, 1, SamplingParams(prompt_logprobs=3, ignore_eos=True))
    for p, o in zip(prompts, outs):
        lp = torch.log_softmax(llm.prompt_logits([p])[0].double(), -1)
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
        for m in range(1, len(p)):
            e = o.prompt_logprobs[m]
            assert e.token_id == p[m] and abs(e.logprob - float(lp[m - 1, p[m]])) < 1e-4
            assert [i for i, _ in e.top] == lp[m - 1].topk(3).indices.tolist()


def test_bad_settings_are_one_line_errors():
    from flexrun import FlexrunError
    for kw, msg in ((dict(n=0), "n must be"), (dict(top_logprobs=3), "needs logprobs"),
                    (dict(logprobs=True, top_logprobs=21), "top_logprobs must be"),
                    (dict(stop=["a"] * 5), "stop must be"), (dict(max_tokens=0), "max_tokens")):
        with pytest.raises(FlexrunError, match=msg):
            SamplingParams(**kw)


def test_chat_renders_the_template_and_generates(llama_dir):
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    conv = [{"role": "user", "content": "hello world"}]
    with LLM(str(llama_dir), device="cpu") as llm:
        ids = llm.chat_prompt_ids(conv, chat_template=template)
        assert ids == llm.tokenizer.encode("<|user|>hello world\n<|assistant|>",
                                           add_special_tokens=False).ids
        out = llm.chat([conv], 5, GREEDY, chat_template=template)[0]
        assert out.prompt_ids == ids and len(out.output_ids) == 5
        from flexrun import FlexrunError
        with pytest.raises(FlexrunError, match="has no chat template"):
            llm.chat([conv], 5)


def test_each_prompt_fits_with_its_own_cap(llama_dir):
    """A request's own max_tokens, not the call's, decides whether its prompt fits."""
    from flexrun import FlexrunError
    with LLM(str(llama_dir), device="cpu") as llm:
        limit = llm.spec.max_positions
        long = list(range(3, 3 + limit - 8))
        out = llm.generate([long, [5, 6]], 100, [SamplingParams(ignore_eos=True, max_tokens=4),
                                                 SamplingParams(ignore_eos=True)])
        assert [len(o.output_ids) for o in out] == [4, 100]
        with pytest.raises(FlexrunError, match="exceeds the model's"):
            llm.generate([long], 100, SamplingParams(max_tokens=9))


def test_stop_string_check_decodes_a_bounded_tail():
    """Each step's stop-string check decodes only the last ids (not the whole output): the
    match is found at the token that completes it, however long the output already is."""
    from flexrun.engine.sampling import STOP_MARGIN, Sampler
    seen = []

    def decode(ids):
        seen.append(len(ids))
        return "".join(chr(97 + i % 26) for i in ids)
    s = Sampler(SamplingParams(stop=["xyz"]), [], decode)
    out = [0] * 900 + [23, 24]
    assert s.stop_string_hit(0, out) is None
    assert s.stop_string_hit(0, out + [25]) == len(out) + 1
    assert max(seen) <= len("xyz") + STOP_MARGIN
