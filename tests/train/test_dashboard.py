import io

import pytest
import torch

from blockyard.train.dashboard import Dashboard


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def run(stream, steps=35, total=35, every_s=10.0, dt=1.0, **kw):
    clock = Clock()
    with Dashboard(total, every_s=every_s, stream=stream, clock=clock, **kw) as dash:
        for step in range(1, steps + 1):
            dash.update(step, loss=1.0 / step)
            clock.t += dt
    return stream.getvalue()


def test_non_tty_writes_one_full_line_per_interval_and_no_carriage_return():
    out = run(io.StringIO())
    assert "\r" not in out
    lines = out.splitlines()
    assert out.endswith("\n")
    # first update (t=0), then t=10, 20, 30, then the final step 35 (t=34)
    assert [line.split()[1] for line in lines] == ["1/35", "11/35", "21/35", "31/35", "35/35"]
    assert all("it/s" in line and "ETA" in line and "loss" in line for line in lines)


def test_tty_redraws_in_place_and_ends_the_line_on_close():
    out = run(FakeTTY(), steps=5, total=10, tty_every_s=0.0)
    assert out.count("\r") == 5 and out.count("\n") == 1 and out.endswith("\n")
    frames = out.rstrip("\n").split("\r")[1:]
    assert [f.split()[1] for f in frames] == ["1/10", "2/10", "3/10", "4/10", "5/10"]


def test_tty_pads_over_a_longer_previous_line():
    stream, clock = FakeTTY(), Clock()
    dash = Dashboard(10, stream=stream, tty_every_s=0.0, clock=clock)
    dash.update(1, note="a long message here")
    dash.update(2)
    first, second = stream.getvalue().split("\r")[1:]
    assert len(second) >= len(first)  # the old text is blanked, not left behind


def test_rate_and_eta_are_computed_from_progress_and_time():
    stream, clock = io.StringIO(), Clock()
    dash = Dashboard(101, every_s=5.0, stream=stream, clock=clock)
    dash.update(1)
    clock.t = 10.0
    dash.update(21, loss=torch.tensor(0.25), lr=1e-3)
    last = stream.getvalue().splitlines()[-1]
    assert "step 21/101" in last and "2 it/s" in last and "ETA 0:00:40" in last  # 80 steps at 2 it/s
    assert "loss 0.25" in last and "lr 0.001" in last


def test_metrics_are_formatted_only_when_a_line_is_drawn():
    calls = []

    class Probe:
        def __str__(self):
            calls.append(1)
            return "probe"

    clock = Clock()
    dash = Dashboard(100, every_s=10.0, stream=io.StringIO(), clock=clock)
    for step in range(1, 50):
        dash.update(step, x=Probe())  # the clock does not move: only the first update draws
    assert len(calls) == 1


def test_write_prints_a_message_without_breaking_the_bar():
    stream = FakeTTY()
    dash = Dashboard(10, stream=stream, tty_every_s=0.0, clock=Clock())
    dash.update(3)
    dash.write("evaluating")
    out = stream.getvalue()
    assert "evaluating\n" in out and out.rstrip().endswith("3/10  30.0% | -- it/s | ETA --:--")
    plain = io.StringIO()
    Dashboard(10, stream=plain, clock=Clock()).write("hello")
    assert plain.getvalue() == "hello\n"


def test_non_main_rank_prints_nothing():
    stream = io.StringIO()
    dash = Dashboard(10, stream=stream, is_main=False, every_s=0.0)
    for step in range(1, 11):
        dash.update(step, loss=1.0)
    dash.write("x")
    dash.close()
    assert stream.getvalue() == ""


def test_defaults_to_stdout_and_close_shows_an_undrawn_final_state(capsys):
    clock = Clock()
    dash = Dashboard(10, clock=clock)
    dash.update(1)
    dash.update(2)  # within the interval: not drawn yet
    dash.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["1/10", "2/10"]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total"):
        Dashboard(0)
    with pytest.raises(ValueError, match="every_s"):
        Dashboard(10, every_s=-1)
