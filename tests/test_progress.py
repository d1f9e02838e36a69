"""The heartbeat: a long step without output says which phase runs and for how long."""

from __future__ import annotations

import threading

from edgec import progress
from edgec.progress import Heartbeat, heartbeat, phase


def test_line_names_the_innermost_phase_after_a_quiet_spell():
    beat = Heartbeat(lambda _: None, quiet=8.0, every=30.0)
    assert beat.line(now=1e9) is None  # no phase: nothing to say
    beat.last_output = 100.0
    beat.phases = [("edgec compile", 90.0), ("android: export, calibrate, quantize, lower (executorch)", 95.0)]
    assert beat.line(now=105.0) is None  # output 5 s ago
    assert beat.line(now=109.0) == "  ... android: export, calibrate, quantize, lower (executorch): running for 0:14"
    beat.last_beat = 109.0
    assert beat.line(now=120.0) is None  # then every 30 s
    assert beat.line(now=139.5) == "  ... android: export, calibrate, quantize, lower (executorch): running for 0:44"
    beat.phases[-1] = ("long", 139.5 - 3725)
    beat.last_beat = 0.0
    beat.last_output = 139.5 - 100
    assert beat.line(now=139.5).endswith("running for 1:02:05")


def test_heartbeat_prints_through_emit_and_phases_nest():
    lines: list[str] = []
    seen = threading.Event()

    def emit(text: str) -> None:
        lines.append(text)
        seen.set()

    assert progress._active is None
    with heartbeat(emit, quiet=0.0, every=0.0):
        with phase("outer"), phase("golden: the teacher's outputs on the eval set"):
            assert seen.wait(20), "no heartbeat line"
        assert progress._active is not None
    assert progress._active is None
    assert lines[0].startswith("  ... golden: the teacher's outputs on the eval set: running for ")
    with phase("no heartbeat: costs nothing"):
        pass


def test_disabled_heartbeat_is_silent():
    with heartbeat(lambda _: (_ for _ in ()).throw(AssertionError("spoke")), enabled=False) as beat:
        assert beat is None


def test_distill_bar_says_no_loss_yet_before_the_first_step():
    from edgec.distill.trainer import _Bar

    bar = _Bar(total=10, done=0)
    try:
        fields = bar.progress.tasks[0].fields
        assert (fields["loss_text"], fields["ips_text"]) == ("loss -", "first step...")
        bar.update(1, loss=0.25, ips=12.4, epoch=1)
        fields = bar.progress.tasks[0].fields
        assert (fields["loss_text"], fields["ips_text"]) == ("loss 0.2500", "12 img/s")
    finally:
        bar.close()
