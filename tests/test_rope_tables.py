"""A decode step makes a batch's RoPE tables once and every layer reuses them (fewer small
kernels per layer call); the prefill makes them per layer as before."""
from flexrun import LLM, Policy, SamplingParams
from flexrun.models.rope import Rope


def test_decode_steps_make_the_rope_tables_once_per_batch(monkeypatch):
    made = []
    real = Rope.cos_sin

    def counted(self, positions, dtype):
        made.append(positions.shape[-1])
        return real(self, positions, dtype)
    monkeypatch.setattr(Rope, "cos_sin", counted)
    pol = Policy(gpu_batch_size=2, num_gpu_batches=2)
    with LLM("dummy:llama-tiny", device="cpu", policy=pol, dtype="float32") as llm:
        out = llm.generate([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], 4,
                           SamplingParams(ignore_eos=True))
        layers = llm.spec.num_layers
    assert all(len(o.output_ids) == 4 for o in out)
    decode = [n for n in made if n == 1]
    assert len(decode) == 3 * 2                 # 3 decode steps x 2 batches
    assert len(made) - len(decode) == 2 * layers     # the prefill: per batch and layer
