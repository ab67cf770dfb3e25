"""bench.mem_history: the replay of an allocator history finds the peak and who grew it."""
from bench.mem_history import by_stream, summarize


def _e(action, addr, size, fn="x.py", line=1, name="f"):
    return {"action": action, "addr": addr, "size": size,
            "frames": [{"filename": f"/r/flexrun/engine/{fn}", "line": line, "name": name}]}


def test_live_at_peak_and_segment_growth_by_source():
    G = 2**30
    trace = [_e("free_completed", 900, 5 * G),      # allocated before the window: not counted
             _e("segment_alloc", 0, 4 * G, "kvquant.py", 10, "read"),
             _e("alloc", 0, 3 * G, "kvquant.py", 10, "read"),
             _e("alloc", 100, 1 * G, "pipeline.py", 5, "attn"),
             _e("free_completed", 0, 3 * G, "kvquant.py", 10, "read"),
             _e("alloc", 200, 2 * G, "pipeline.py", 5, "attn"),
             _e("segment_map", 4 * G, 2 * G, "storage.py", 7, "to_dev")]
    lines = summarize(trace)
    assert "4.000 GiB (entry 3 of 7)" in lines[0]
    assert "3.000 GiB" in lines[1] and "kvquant.py:10 read" in lines[1]
    assert "1.000 GiB" in lines[2] and "pipeline.py:5 attn" in lines[2]
    seg = lines.index(next(x for x in lines if x.startswith("memory reserved")))
    assert "6.000 GiB in 2" in lines[seg] and "kvquant.py:10" in lines[seg + 1]
    assert "storage.py:7 to_dev" in lines[seg + 2]    # expandable segments map pages


def test_reserved_by_stream_sums_each_pool():
    G = 2**30
    segs = [{"device": 0, "stream": 0, "total_size": 4 * G, "allocated_size": 3 * G},
            {"device": 0, "stream": 0x10, "total_size": 6 * G, "allocated_size": 1 * G},
            {"device": 0, "stream": 0, "total_size": 1 * G, "allocated_size": 0},
            {"device": 1, "stream": 0, "total_size": 9 * G, "allocated_size": 9 * G}]
    lines = by_stream(segs, 0)
    assert "2 stream(s)" in lines[0]
    assert "stream 0x10: reserved 6.000 GiB, allocated 1.000 GiB in 1" in lines[1]
    assert "stream 0x0: reserved 5.000 GiB, allocated 3.000 GiB in 2" in lines[2]
