"""Progress bars only where someone watches (a terminal, or progress=True); one summary line a long step
otherwise; nothing with progress=False. pytest's capture makes stderr a file, as in CI or a log."""
import sys

import torch

import adaptc
from adaptc.tuner.session import tune_calls
from adaptc.tuner.tune import Budget
from tests.passes.test_early_exit import bert_batches, small_bert


def _compile_ee(**kw):
    from transformers import BertForSequenceClassification

    model = small_bert(BertForSequenceClassification, num_labels=3)
    cal = bert_batches(6)
    return adaptc.compile(model, example_inputs=cal[0], passes=["early_exit"], calibration=cal, quality=0.6,
                          tune=False, distill_steps=20, **kw)


def _adaptc_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("adaptc: ")]


def test_a_compile_off_a_terminal_draws_no_bar_and_says_each_long_step_once(capsys):
    assert not sys.stderr.isatty()
    _compile_ee()
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err and "distilling" not in err  # no bar, no redraws
    (line,) = _adaptc_lines(err)
    assert line.startswith("adaptc: distilled 3 exit heads (20 steps) in ") and line.endswith(" s")

    _compile_ee(progress=False)
    assert _adaptc_lines(capsys.readouterr().err) == []  # asked for silence

    _compile_ee(progress=True)  # asked for the bar, even off a terminal
    err = capsys.readouterr().err
    assert "distilling exit heads" in err and _adaptc_lines(err) == []


def test_tuning_off_a_terminal_is_one_summary_line(capsys):
    from adaptc.kernels.moe import space

    args = space.make_inputs(10, 32, 32, 4, 2, seed=1)
    fast = Budget(trials=2, seconds=5.0, seconds_per_trial=0.005)
    tune_calls(lambda: torch.ops.adaptc.fused_moe(*args), fast)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    (line,) = _adaptc_lines(err)
    assert line.startswith("adaptc: tuned 1 kernel problem(s): 2 measurements, 0 from the cache in ")
    tune_calls(lambda: torch.ops.adaptc.fused_moe(*args), fast, progress=False)
    assert _adaptc_lines(capsys.readouterr().err) == []
    tune_calls(lambda: None, fast)  # nothing to tune: nothing to say
    assert capsys.readouterr().err == ""
