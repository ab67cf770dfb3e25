"""engine/kvcache.StoreHold: the device tensors of in-flight stores are held until their copy
has run, at most STORES_IN_FLIGHT at a time (events stand in for CUDA events here)."""
from flexrun.config import STORES_IN_FLIGHT
from flexrun.engine.kvcache import StoreHold


class FakeEvent:
    def __init__(self, log: list, name: str):
        self.log, self.name, self.done = log, name, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.log.append(self.name)
        self.done = True


def test_holds_at_most_the_limit_and_waits_for_the_oldest():
    log: list = []
    hold = StoreHold()
    evs = [FakeEvent(log, f"e{i}") for i in range(4)]
    for i in range(STORES_IN_FLIGHT):
        hold.add(evs[i], (f"t{i}",))
    assert log == [] and len(hold.held) == STORES_IN_FLIGHT
    hold.add(evs[2], ("t2",))               # full: the host waits for the oldest store
    assert log == ["e0"] and [h[1] for h in hold.held] == [("t1",), ("t2",)]
    evs[1].done = evs[2].done = True        # copies that have run are let go without a wait
    hold.add(evs[3], ("t3",))
    assert log == ["e0"] and [h[1] for h in hold.held] == [("t3",)]
    hold.clear()
    assert log == ["e0", "e3"] and hold.held == []
