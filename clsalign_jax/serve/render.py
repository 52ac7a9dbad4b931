"""A finished row as the API returns it: the completion text, finish_reason and the `clsalign` verdict.

Coordinates: the API speaks of completion tokens (index 0 = the first token after any assistant
prefill); `RowResult` counts from the first response slot (prefill included), so every index is
shifted by the prefill's length here.
"""

from __future__ import annotations

import dataclasses
import math

from clsalign_jax.data.tokenizer import Tokenizer
from clsalign_jax.decode.loop import RowResult


@dataclasses.dataclass
class Completion:
  ids: list[int]  # completion tokens returned (an end token included, which the text skips)
  text: str
  finish_reason: str  # "stop" (end token, stop sequence, or the response ended on its refusal) or "length"
  refusal_index: int  # completion-token index where the refusal prefix starts; -1: none within `ids`
  refusal_char: int  # its offset in `text`; -1: none
  clsalign: dict


def first_stop(text: str, stops: list[str]) -> int:
  hits = [i for i in (text.find(s) for s in stops) if i >= 0]
  return min(hits) if hits else -1


def complete(
  row: RowResult,
  max_tokens: int,
  tokenizer: Tokenizer,
  eos_id: int,
  threshold: float,
  stops: list[str] = (),
  with_trace: bool = False,
) -> Completion:
  pre = row.prefill_len
  ids = row.response_ids[pre:][:max_tokens]
  finish = "length" if len(ids) >= max_tokens else "stop"
  if ids and ids[-1] == eos_id:
    finish = "stop"
  text = tokenizer.decode(ids, skip_special_tokens=True)
  cut = first_stop(text, list(stops))
  if cut >= 0:
    text, finish = text[:cut], "stop"
  ins = row.insert_index - pre if row.insert_index >= 0 else -1
  if ins >= len(ids):
    ins = -1  # the refusal went in past this request's max_tokens (module docstring of engine.py)
  ins_char = len(tokenizer.decode(ids[:ins], skip_special_tokens=True)) if ins >= 0 else -1
  if cut >= 0 and ins_char >= len(text):
    ins, ins_char = -1, -1  # cut off by a stop sequence
  verdict = {
    "p_malicious": row.p_initial,
    "malicious": row.initial_malicious,
    "threshold": threshold,
    "refusal_inserted": ins >= 0,
    "refusal_index": ins if ins >= 0 else None,
    "refusal_char": ins_char if ins >= 0 else None,
    # "prompt": Rule 1 (malicious at prompt time); "flip": a confirmed flip during the response.
    "refusal_cause": None if ins < 0 else ("prompt" if row.trigger_step < 0 else "flip"),
    "flip_index": (row.trigger_index - pre) if row.trigger_index >= 0 else None,
    "false_alarms": row.false_alarms,
  }
  if with_trace:
    verdict["trace"] = [{"step": s, "index": i - pre, "p_malicious": p} for s, i, p in row.trace if not math.isnan(p)]
  return Completion(ids, text, finish, ins, ins_char, verdict)
