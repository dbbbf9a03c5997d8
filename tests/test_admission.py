"""The pure connection caps of `tally.ops.admission`."""

from __future__ import annotations

from tally.ops.admission import BURST_QUIET_S, PER_UID, TOTAL, Admission


def test_per_uid_cap_leaves_room_for_other_uids_and_slots_come_back() -> None:
    caps = Admission(total=4, per_uid=2)
    assert caps.admit(0) is None and caps.admit(0) is None
    assert caps.admit(0) == PER_UID
    assert caps.admit(65534) is None and caps.admit(65534) is None
    assert caps.admit(1000) == TOTAL
    caps.release(0)
    assert caps.admit(0) is None
    assert caps.refused == {PER_UID: 1, TOTAL: 1}
    assert caps.open == 4


def test_a_burst_of_refusals_is_reported_once_with_its_count() -> None:
    caps = Admission(total=1)
    assert caps.admit(None) is None
    caps.admit(None)
    assert caps.report(100.0) == 1
    for i in range(5):
        caps.admit(None)
        assert caps.report(101.0 + i) is None
    caps.admit(None)
    assert caps.report(105.0 + BURST_QUIET_S) == 6
