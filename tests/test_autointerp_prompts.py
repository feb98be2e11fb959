"""Prompt building and answer reading (logprobs first, text fallback) on crafted answers."""

import math

import pytest

from metasae_jax.autointerp import prompts, scorers
from metasae_jax.autointerp.backends import Completion


def test_render_marks_and_keeps_spaces_outside():
  text = prompts.render(["The", " cat", "\n", " sat"], [False, True, False, True])
  assert text == "The <<cat>>\\n <<sat>>"


def test_strength_levels():
  assert prompts.strength_levels([0.0, 0.01, 5.0, 10.0, 20.0], 10.0) == [0, 1, 5, 10, 10]
  assert prompts.strength_levels([1.0], 0.0) == [0]


def test_explain_messages_show_marks_and_strengths():
  msgs = prompts.explain_messages([(["a", " cat"], [0.0, 2.0]), (["dog"], [4.0])], max_act=4.0)
  assert [m["role"] for m in msgs] == ["system", "user"]
  user = msgs[1]["content"]
  assert "Example 1: a <<cat>>" in user and "Active: cat (5)" in user
  assert "Example 2: <<dog>>" in user and "Active: dog (10)" in user


def test_score_messages_mark_what_they_should():
  s = prompts.strength_messages("cats", ["a", " big", " cat"])[1]["content"]
  assert "a big <<cat>>" in s and "0 (not at all) to 10" in s and "Feature: cats" in s
  d = prompts.fuzz_messages("cats", ["a", " big", " cat"], [False, True, False])[1]["content"]
  assert "a <<big>> cat" in d and "yes or no" in d
  c = prompts.detection_messages("cats", ["a", " big", " cat"])[1]["content"]
  assert "Text: a big cat\n" in c and "<<" not in c and "anywhere" in c and "yes or no" in c


@pytest.mark.parametrize("text,want", [
    ("Explanation: words about cats\nignored", "words about cats"),
    ("\n  \"plural nouns\"  ", "plural nouns"),
    ("", None), ("   \n ", None)])
def test_parse_explanation(text, want):
  assert prompts.parse_explanation(text) == want


@pytest.mark.parametrize("text,want", [
    ("7", 7), (" 10.", 10), ("I'd say 3 out of 10", 3), ("0", 0), ("11", None), ("-1", None),
    ("2.5", None), ("Text: the <<cat>>", None), ("", None)])
def test_parse_strength(text, want):
  assert prompts.parse_strength(text) == want


@pytest.mark.parametrize("text,want", [
    ("Yes", True), (" no.", False), ("YES, it is", True), ("maybe", None), ("", None), ("Nope", None)])
def test_parse_yes_no(text, want):
  assert prompts.parse_yes_no(text) == want


def test_read_strength_expected_value_from_top_logprobs():
  c = Completion("7", {"7": math.log(0.5), " 3": math.log(0.25), "3": math.log(0.125),
                       "foo": math.log(0.125)})
  # Digits carry 0.875 of the mass: (7*0.5 + 3*0.375) / 0.875.
  assert scorers.read_strength(c) == pytest.approx((3.5 + 1.125) / 0.875)


def test_read_strength_prefers_choice_logprobs_and_falls_back_to_text():
  c = Completion("9", {"9": 0.0}, {"2": math.log(0.3), "4": math.log(0.1)})
  assert scorers.read_strength(c) == pytest.approx((0.6 + 0.4) / 0.4)
  assert scorers.read_strength(Completion("answer: 6", {"The": -0.1})) == 6.0
  assert scorers.read_strength(Completion("Text: the cat", {"Text": -0.1})) is None


def test_read_yes():
  c = Completion("Yes", {"Yes": math.log(0.6), " no": math.log(0.2), "x": math.log(0.2)})
  assert scorers.read_yes(c) == pytest.approx(0.75)
  assert scorers.read_yes(Completion("no", {})) == 0.0
  assert scorers.read_yes(Completion("perhaps", {"perhaps": 0.0})) is None
