"""engine/kvcache.StoreHold: the device tensors of in-flight stores are held until their copy
has run, their storage under STORES_IN_FLIGHT times the largest store's (events stand in for
CUDA events, CPU tensors for device ones)."""
import torch

from flexrun.config import STORES_IN_FLIGHT
from flexrun.engine.kvcache import StoreHold, storage_bytes


class FakeEvent:
    def __init__(self, log: list, name: str):
        self.log, self.name, self.done = log, name, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.log.append(self.name)
        self.done = True


def test_holds_the_largest_stores_bound_and_waits_for_the_oldest():
    log: list = []
    hold = StoreHold()
    big = [torch.empty(1000, dtype=torch.uint8) for _ in range(STORES_IN_FLIGHT + 2)]
    evs = [FakeEvent(log, f"e{i}") for i in range(len(big))]
    for i in range(STORES_IN_FLIGHT):
        hold.add(evs[i], (big[i],))
    assert log == [] and hold.bytes == STORES_IN_FLIGHT * 1000
    hold.add(evs[STORES_IN_FLIGHT], (big[STORES_IN_FLIGHT],))   # over: waits for the oldest
    assert log == ["e0"] and hold.bytes == STORES_IN_FLIGHT * 1000
    for e in evs[:STORES_IN_FLIGHT + 1]:
        e.done = True                      # copies that have run are let go without a wait
    small = [torch.empty(10, dtype=torch.uint8) for _ in range(50)]   # decode-sized stores
    for t in small:
        hold.add(FakeEvent(log, "small"), (t,))
    assert log == ["e0"] and len(hold.held) == 50       # they fit beside each other
    hold.clear()
    assert hold.held == [] and hold.bytes == 0


def test_views_of_one_output_count_once_and_a_group_is_one_store():
    qkv = torch.empty(3, 64)
    k, v = qkv[1], qkv[2]
    assert storage_bytes((k, v, None)) == qkv.numel() * 4
    log: list = []
    hold = StoreHold()
    with hold.group():
        hold.add(FakeEvent(log, "plane1"), (torch.empty(8),))
        hold.add(FakeEvent(log, "plane2"), (torch.empty(8),))
        assert hold.held == []
    assert len(hold.held) == 1 and hold.held[0][0].name == "plane2"
    assert hold.bytes == 64
