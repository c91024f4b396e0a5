"""`--calib A,B`: several calibration texts mixed in equal shares of the windows."""
from __future__ import annotations

import pytest
import torch

from depthprune.adapters.load import calibration, load_model
from depthprune.adapters.text import check_text_spec, load_text, load_texts, text_specs
from depthprune.adapters.tokens import mixed_windows, token_windows, tokenizer_of
from depthprune.errors import SpecError, UserError


@pytest.mark.unit
def test_specs_split_on_commas_unless_the_path_exists(tmp_path):
    assert text_specs("shakespeare:calib") == ["shakespeare:calib"]
    assert text_specs("shakespeare:calib, pydoc:reference") == ["shakespeare:calib", "pydoc:reference"]
    odd = tmp_path / "a,b.txt"
    odd.write_text("some words " * 50)
    assert text_specs(str(odd)) == [str(odd)]
    check_text_spec(str(odd))
    plain = tmp_path / "plain.txt"
    plain.write_text("other words " * 50)
    assert load_text(f"{plain},shakespeare:macbeth") == load_text(str(plain)) + "\n\n" + load_text("shakespeare:macbeth")


@pytest.mark.unit
def test_a_bad_part_is_named(tmp_path):
    with pytest.raises(SpecError, match="no play 'nosuch'"):
        check_text_spec("shakespeare:calib,shakespeare:nosuch")
    with pytest.raises(SpecError, match="--calib is empty"):
        check_text_spec("shakespeare:calib,")


@pytest.mark.unit
def test_windows_are_equal_shares_of_each_text_interleaved():
    lm = load_model("random-llama:2")
    tok = tokenizer_of(lm)
    a, b = load_texts("shakespeare:macbeth,pydoc:reference")
    mixed = mixed_windows(tok, [a, b], 5, 16)
    only_a, only_b = token_windows(tok, a, 3, 16), token_windows(tok, b, 2, 16)
    assert mixed.shape == (5, 16)
    assert torch.equal(mixed, torch.stack([only_a[0], only_b[0], only_a[1], only_b[1], only_a[2]]))
    with pytest.raises(UserError, match="2 calibration texts need at least 2 samples"):
        mixed_windows(tok, [a, b], 1, 16)
    batches = calibration(lm, "shakespeare:macbeth,pydoc:reference", 5, 16, batch_size=4)
    assert [x[0].shape[0] for x in batches] == [4, 1]
    assert torch.equal(torch.cat([x[0] for x in batches]), mixed)
