"""4-bit weight search at load (memory/wquant.py, memory/synth_stats.py): same packed format
as round-to-nearest, never a worse group, exact groups untouched; the per-checkpoint cache
(mode 0600, reused on reload, skipped with a note where it cannot be written)."""
import os
import stat

import pytest
import torch

from conftest import ragged_prompts
from flexrun import LLM, Policy, SamplingParams
from flexrun.memory import wquant
from flexrun.memory.quant import compress, decompress

GREEDY = SamplingParams(ignore_eos=True)


def weight(rows=48, cols=256, seed=0) -> torch.Tensor:
    """Gaussian rows with a few large values (what makes min-max groups coarse)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[torch.rand(rows, cols, generator=g) < 0.01] *= 8
    return w


def group_err(w, c, imp=None):
    d = (decompress(c).float() - w).square()
    if imp is not None:
        d = d * imp
    return d.view(w.shape[0], -1, 64).sum(-1)


@pytest.mark.parametrize("scheme", ["hqq", "synth"])
def test_same_format_and_never_worse_per_group(scheme):
    w = weight()
    imp = torch.rand(256, generator=torch.Generator().manual_seed(1)) ** 4 * 10 + 0.1
    rtn = compress(w, 4, 64, dim=-1)
    c = wquant.quantize(w, 4, 64, scheme, imp if scheme == "synth" else None)
    for f in ("data", "mins", "scales"):
        a, b = getattr(c, f), getattr(rtn, f)
        assert a.shape == b.shape and a.dtype == b.dtype
    assert (c.shape, c.dim, c.bits, c.group_size, c.pad) == (rtn.shape, 1, 4, 64, 0)
    # the weighted error the scheme minimises (plain squared error for hqq's pick)
    use = None if scheme == "hqq" else imp / imp.mean() + 1e-3
    e, e0 = group_err(w, c, use), group_err(w, rtn, use)
    assert (e <= e0 * (1 + 1e-6)).all()
    assert e.sum() < (0.97 if scheme == "hqq" else 0.9) * e0.sum()


@pytest.mark.parametrize("scheme", ["hqq", "synth"])
def test_exact_groups_are_kept(scheme):
    """Groups that round-to-nearest reproduces exactly (a Q4_1 block at its own group size)
    are never moved, also beside groups that are searched."""
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (16, 128), generator=g).float()
    codes[:, ::32], codes[:, 1::32] = 0, 15
    w = codes * 0.25 - 1.0                                  # exact at group 32
    c = wquant.quantize(w, 4, 32, scheme, torch.rand(128, generator=g))
    assert torch.equal(decompress(c), w)
    mixed = torch.cat([w, weight(16, 128)], 0)
    c = wquant.quantize(mixed, 4, 32, scheme, torch.rand(128, generator=g))
    assert torch.equal(decompress(c)[:16], w)


@pytest.mark.parametrize("scheme", ["rtn", "hqq", "synth"])
def test_quantizing_by_rows_gives_the_whole_tensors_result(scheme, monkeypatch):
    """A large weight is quantized a block of rows at a time at load (bounded temporaries):
    the parts joined are bit for bit the whole's, exact rows kept beside searched ones."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (24, 256), generator=g).float()
    codes[:, ::64], codes[:, 1::64] = 0, 15
    w = torch.cat([weight(40, 256), codes * 0.25 - 1.0, weight(17, 256, seed=4)], 0)
    imp = torch.rand(256, generator=g) + 0.1

    def run(values):
        monkeypatch.setattr(wquant, "LOAD_CHUNK", values)
        q = wquant.WeightQuantizer("", 4, 64, scheme, torch.float32)
        q.importance = {"w": imp}
        q.stats = lambda: {"w": imp}
        return q("w", w), q.count
    (whole, n_whole), (parts, n_parts) = run(1 << 30), run(10 * 256)   # 10 rows at a time
    assert n_whole == n_parts == (scheme != "rtn")
    for f in ("data", "mins", "scales"):
        assert torch.equal(getattr(whole, f), getattr(parts, f)), f
    assert (whole.shape, whole.pad, whole.dim) == (parts.shape, parts.pad, parts.dim)
    assert torch.equal(decompress(parts)[40:64], codes * 0.25 - 1.0)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "quant"
    monkeypatch.setattr(wquant, "cache_dir", lambda: d)
    monkeypatch.setattr(wquant, "MIN_CACHE_BYTES", 0)       # the tiny model's 0.1 MB too
    return d


def _load(model_dir, scheme="synth", **kw):
    pol = Policy(compress_weight=True, weight_scheme=scheme, quant_group=32, **kw)
    with LLM(str(model_dir), device="cpu", policy=pol) as llm:
        out = [o.output_ids for o in llm.generate(ragged_prompts(4), 6, GREEDY)]
        return out, llm.stats.weight_quant_s


@pytest.mark.parametrize("scheme", ["synth", "hqq"])
def test_cache_file_private_and_reused(llama_dir, cache_dir, monkeypatch, capsys, scheme):
    out, _ = _load(llama_dir, scheme)
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".fq4"
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert f"weights: {scheme} 4-bit groups of 32" in capsys.readouterr().err

    def no_search(*a, **k):
        raise AssertionError("searched again despite the cache")
    monkeypatch.setattr(wquant, "quantize", no_search)
    monkeypatch.setattr(wquant.WeightQuantizer, "_importance", no_search)
    again, seconds = _load(llama_dir, scheme)
    assert again == out and seconds > 0
    assert "weights:" not in capsys.readouterr().err       # nothing searched, nothing logged


def test_rtn_and_dummy_weights_write_no_cache(llama_dir, cache_dir):
    _load(llama_dir, "rtn")
    assert not cache_dir.exists()
    assert wquant.cache_key("", 4, 64, "synth", torch.float32) is None     # dummy:<preset>


def test_unwritable_cache_dir_is_a_note(llama_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(wquant, "cache_dir", lambda: blocker / "quant")
    monkeypatch.setattr(wquant, "MIN_CACHE_BYTES", 0)
    out, _ = _load(llama_dir)
    err = capsys.readouterr().err
    assert "quantized weights not cached: cannot write" in err
    assert len([x for x in err.splitlines() if "not cached" in x]) == 1
    assert out and blocker.read_text() == "not a directory"


def test_too_little_free_space_is_a_note(llama_dir, cache_dir, monkeypatch, capsys):
    class Usage:
        free = 1000
    monkeypatch.setattr(wquant.shutil, "disk_usage", lambda p: Usage())
    _load(llama_dir)
    assert "MiB needed" in capsys.readouterr().err
    assert not any(cache_dir.iterdir())


def test_changed_checkpoint_misses_the_cache(llama_dir, tmp_path, cache_dir):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(llama_dir, d)
    _load(d)
    f = next(d.glob("*.safetensors"))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    _load(d)
    assert len(list(cache_dir.iterdir())) == 2


def test_activation_stats_cover_every_linear(llama_dir, opt_dir):
    from flexrun.memory.synth_stats import activation_stats
    from flexrun.models.llama import model_for
    from flexrun.models.loader import open_checkpoint
    from flexrun.plan.footprint import is_compressible
    for d in (llama_dir, opt_dir):
        ck = open_checkpoint(str(d))
        st = activation_stats(ck.spec, model_for(ck.spec), ck.iter_tensors(lambda n: "cpu"),
                              torch.device("cpu"), torch.float32, is_compressible)
        want = {n for n, s in ck.spec.all_shapes().items()
                if n.startswith("layers.") and is_compressible(n, s)}
        assert set(st) == want
        for n, v in st.items():
            assert v.shape == (ck.spec.all_shapes()[n][1],) and (v >= 0).all() and v.sum() > 0, n


def test_small_checkpoints_are_not_cached(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(wquant, "cache_dir", lambda: tmp_path / "quant")
    _load(llama_dir)
    assert not (tmp_path / "quant").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["hqq", "synth"])
def test_cuda_search_never_worse(scheme):
    w = weight().cuda()
    imp = torch.rand(256, device="cuda") + 0.1
    c = wquant.quantize(w, 4, 64, scheme, imp)
    assert c.data.is_cuda
    rtn = compress(w, 4, 64, dim=-1)
    use = None if scheme == "hqq" else imp / imp.mean() + 1e-3
    assert (group_err(w, c, use) <= group_err(w, rtn, use) * (1 + 1e-6)).all()


def test_grid_kernel_failure_falls_back_to_torch_once(monkeypatch, capsys):
    """The synth search's Triton kernel failing to build or run (a device it was never run
    on) leaves torch's search to do the job: the same result, one note, no retry."""
    from flexrun.kernels import quant_search
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("PassManager::run failed\nmore")
    monkeypatch.setattr(quant_search, "applies", lambda g: True)
    monkeypatch.setattr(quant_search, "grid_search", broken)
    monkeypatch.setattr(wquant, "_KERNEL_FAILED", [])
    x = torch.randn(16, 128)
    want = wquant._grid(*_grouped_weights(x), 4)
    for _ in range(2):
        c = wquant.quantize(x, 4, 64, "synth")
        assert torch.equal(c.mins, want[0]) and torch.equal(c.scales, want[1])
    assert calls == [1]
    err = capsys.readouterr().err
    assert err.count("Triton grid search failed (RuntimeError: PassManager::run failed)") == 1


def _grouped_weights(x):
    from flexrun.memory.quant import grouped
    g, _ = grouped(x, 64, 1)
    return g, torch.ones(1, g.shape[1], 64) * (1 + 1e-3)
