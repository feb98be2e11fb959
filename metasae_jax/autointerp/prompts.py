"""Chat prompts for the explainer and the three scorers, and text parsing of their answers (the fallback to logprobs)."""

import re
from typing import Optional, Sequence

OPEN, CLOSE = "<<", ">>"
STRENGTHS = tuple(str(v) for v in range(11))
YES_NO = ("yes", "no")

EXPLAIN_SYSTEM = ("You study a feature of a language model. You see text snippets in which the tokens "
                  "where the feature is active are marked like " + OPEN + "this" + CLOSE + ".")
SCORE_SYSTEM = "You judge where a feature of a language model is active in a text."


def render(pieces: Sequence[str], marked: Sequence[bool]) -> str:
  """Joins decoded token pieces, wrapping marked ones in << >> (leading spaces stay outside the marks)."""
  out = []
  for piece, m in zip(pieces, marked):
    piece = piece.replace("\n", "\\n").replace("\r", "\\r")
    if m:
      body = piece.lstrip(" ")
      out.append(piece[:len(piece) - len(body)] + OPEN + (body or " ") + CLOSE)
    else:
      out.append(piece)
  return "".join(out).strip()


def strength_levels(acts: Sequence[float], max_act: float) -> list:
  """Activations as integers 0..10 relative to the latent's largest known activation (0 only when not firing)."""
  if max_act <= 0:
    return [0 for _ in acts]
  return [0 if a <= 0 else max(1, min(10, int(round(10 * a / max_act)))) for a in acts]


def explain_messages(examples: Sequence[tuple], max_act: float) -> list:
  """Explainer chat: each example is (pieces, acts); firing tokens marked, strongest ones listed with strength."""
  lines = []
  for i, (pieces, acts) in enumerate(examples, 1):
    levels = strength_levels(acts, max_act)
    lines.append(f"Example {i}: {render(pieces, [lv > 0 for lv in levels])}")
    fired = sorted(((lv, p.strip() or repr(p)) for p, lv in zip(pieces, levels) if lv > 0), reverse=True)
    lines.append("Active: " + ", ".join(f"{p} ({lv})" for lv, p in fired[:5]))
  user = ("\n".join(lines) + "\n\nIn one short phrase, what does the feature detect? "
          "Answer with the phrase only.")
  return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def strength_messages(explanation: str, pieces: Sequence[str]) -> list:
  """Scorer A (fuzzing, strength): the last token is marked; the answer is one number 0..10."""
  marked = [False] * (len(pieces) - 1) + [True]
  user = (f"Feature: {explanation}\n\nText: {render(pieces, marked)}\n\n"
          f"How strongly is the feature active on the marked token? "
          "Answer with one number from 0 (not at all) to 10 (very strongly).")
  return [{"role": "system", "content": SCORE_SYSTEM}, {"role": "user", "content": user}]


def fuzz_messages(explanation: str, pieces: Sequence[str], marked: Sequence[bool]) -> list:
  """Scorer B (delphi fuzzing): are the marked tokens the ones where the feature is active? yes/no."""
  user = (f"Feature: {explanation}\n\nText: {render(pieces, marked)}\n\n"
          "Is the feature active on the marked tokens? Answer yes or no.")
  return [{"role": "system", "content": SCORE_SYSTEM}, {"role": "user", "content": user}]


def detection_messages(explanation: str, pieces: Sequence[str]) -> list:
  """Scorer C (delphi detection): is the feature active anywhere in this unmarked text? yes/no."""
  user = (f"Feature: {explanation}\n\nText: {render(pieces, [False] * len(pieces))}\n\n"
          "Is the feature active anywhere in this text? Answer yes or no.")
  return [{"role": "system", "content": SCORE_SYSTEM}, {"role": "user", "content": user}]


def parse_explanation(text: str) -> Optional[str]:
  """First non-empty line, without a leading label or quotes; None if nothing usable."""
  for line in text.splitlines():
    line = re.sub(r"^\s*(explanation|answer|feature|the feature detects)\s*[:\-]\s*", "", line,
                  flags=re.IGNORECASE).strip().strip("\"'`*").strip()
    if line:
      return line[:200]
  return None


def parse_strength(text: str) -> Optional[int]:
  """The first whole number in the answer if it is in 0..10, else None (malformed)."""
  m = re.search(r"-?\d+(?:\.\d+)?", text)
  if m is None:
    return None
  try:
    value = float(m.group())
  except ValueError:
    return None
  if not value.is_integer() or not 0 <= value <= 10:
    return None
  return int(value)


def parse_yes_no(text: str) -> Optional[bool]:
  """True/False if the answer's first word is yes/no (any case, punctuation ignored), else None."""
  m = re.match(r"\W*([A-Za-z]+)", text)
  if m is None:
    return None
  word = m.group(1).lower()
  return True if word == "yes" else False if word == "no" else None
