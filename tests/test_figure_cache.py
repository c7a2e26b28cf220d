"""Figures are drawn again exactly when what they show, the code that draws them, or the file itself changed."""

import numpy as np

from bench.figure_cache import LEDGER, drawn


def test_a_figure_is_drawn_only_when_its_inputs_code_or_file_changed(tmp_path):
    calls = []

    def draw(path):
        calls.append(path.name)
        path.write_bytes(b"png " + str(len(calls)).encode())

    code = tmp_path / "drawing.py"
    code.write_text("style = 1\n")
    target = tmp_path / "figures" / "a.png"
    inputs = {"points": [(1, 2.5)], "values": np.arange(4.0)}
    assert drawn(target, inputs, draw, [code]) == target and calls == ["a.png"]
    drawn(target, inputs, draw, [code])
    assert len(calls) == 1 and (target.parent / LEDGER).is_file()  # current: not drawn again
    drawn(target, {**inputs, "values": np.arange(4.0) + 1e-12}, draw, [code])
    assert len(calls) == 2  # another value
    drawn(target, {**inputs, "values": np.arange(4.0) + 1e-12}, draw, [code])
    assert len(calls) == 2
    code.write_text("style = 2\n")
    drawn(target, {**inputs, "values": np.arange(4.0) + 1e-12}, draw, [code])
    assert len(calls) == 3  # the drawing code changed
    target.write_bytes(b"edited by hand")
    drawn(target, {**inputs, "values": np.arange(4.0) + 1e-12}, draw, [code])
    assert len(calls) == 4 and target.read_bytes() == b"png 4"  # the file no longer what was drawn
    target.unlink()
    drawn(target, {**inputs, "values": np.arange(4.0) + 1e-12}, draw, [code])
    assert len(calls) == 5 and target.is_file()


def test_an_unreadable_ledger_draws_again_rather_than_failing(tmp_path):
    calls = []
    target = tmp_path / "b.png"
    (tmp_path / LEDGER).write_text("{not json")
    drawn(target, [1], lambda path: (calls.append(1), path.write_bytes(b"x")), [])
    assert calls == [1]
