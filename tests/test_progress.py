"""Progress lines stay alive while work reports no steps (training θ̂) or takes long between steps (a cell)."""

import io
import time

from tqdm.auto import tqdm

from bench.heartbeat import heartbeat, refreshing


def test_heartbeat_redraws_its_line_until_the_work_ends(capsys):
    with heartbeat("toy: training θ̂", interval_s=0.05):
        time.sleep(0.5)
    err = capsys.readouterr().err
    assert err.count("toy: training θ̂: 00:00") >= 4  # redrawn about every 0.05 s, not once
    assert "toy: training θ̂: done in" in err


def test_a_disabled_heartbeat_prints_nothing(capsys):
    with heartbeat("quiet", enabled=False, interval_s=0.01):
        time.sleep(0.05)
    assert capsys.readouterr().err == ""


def test_a_bar_keeps_its_clock_moving_between_updates():
    out = io.StringIO()
    bar = tqdm(total=2, desc="cells", file=out, mininterval=0)
    with refreshing(bar, interval_s=0.05):
        time.sleep(0.5)  # one long cell: no update, yet the bar is redrawn
    bar.close()
    assert out.getvalue().count("cells:") >= 5
