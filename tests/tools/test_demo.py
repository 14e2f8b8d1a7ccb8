"""`npcd demo story`: the storyteller, then its beats through two adapters in one batch (real model)."""

from __future__ import annotations

import re

import pytest

from npcd import cli


def test_demo_story_streams_beats_through_both_adapters_in_one_batch(real_model_dir, capsys):
    code = cli.main(["demo", "story", "a lighthouse keeper hears singing from the sea",
                     "--beats", "2", "--max-tokens", "96", "--threads", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Wren (storyteller): a lighthouse keeper hears singing from the sea" in out
    assert "2 beats x 2 personas: one mixed batch of 4 requests" in out
    summary = re.search(r"4 requests, adapters (.+?): up to (\d+) decoded in the same step", " ".join(out.split()))
    assert summary, out
    assert summary.group(1) == "image_prompter, storyteller"
    assert int(summary.group(2)) == 4  # all four lines, two adapters, decoded together
    assert "error" not in out


@pytest.mark.parametrize("argv, message", [
    (["--beats", "0"], "--beats must be >= 1"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--storyteller", "nobody"], "persona 'nobody' is not available"),
])
def test_demo_refuses_bad_arguments_by_name(argv, message, capsys):
    assert cli.main(["demo", "story", "an idea", *argv]) != 0
    assert message in capsys.readouterr().err
