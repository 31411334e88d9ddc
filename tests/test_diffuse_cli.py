"""`ppl diffuse`: FK-steered digits written as a PNG grid (tiny sizes; the method itself is tested
against exact answers in tests/test_fk_steering.py)."""

from __future__ import annotations

import matplotlib.image as mpimg

from app import cli


def test_diffuse_fk_writes_png_and_reports(tmp_path, capsys):
    out = tmp_path / "threes.png"
    argv = ["diffuse", "--class", "3", "--method", "fk", "--particles", "4", "--images", "2",
            "--steps", "6", "--resample-every", "2", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 100  # a rendered grid
    assert f"wrote {out}: 2 images of class 3 by fk, N=4, 6 steps" in text
    assert "evaluator accuracy" in text and "verifier mean log p" in text
    assert "NFE per image 28;" in text  # 4 particles x (6 steps + the final Tweedie call)


def test_diffuse_bad_input_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["diffuse", "--class", "12", "--out", str(tmp_path / "x.png")]) == 2
    assert "--class must be a digit 0..9" in capsys.readouterr().err
    assert cli.main(["diffuse", "--class", "1", "--particles", "0"]) == 2
    assert "--particles must be >= 1" in capsys.readouterr().err
