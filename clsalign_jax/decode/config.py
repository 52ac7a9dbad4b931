"""Strategic-decoding options (docs/method.md §2.2, §3; decisions 5–10 in its §6).

Every field is static for compilation: changing one recompiles the decode loop. Sampling
settings (temperature, top-k, top-p, seeds) are traced inputs instead (see `sampling.py`), so
a decoding-attack grid reuses one compiled loop.
"""

from __future__ import annotations

import dataclasses
import types

import jax.numpy as jnp

SCHEDULES = ("each", "first", "periodic", "annealing")
# The issue text calls the per-token schedule `every`; the released code calls it `each`.
_SCHEDULE_ALIASES = {"every": "each"}
TAU_UNITS = ("events", "steps")

PAPER_REFUSAL = "Sorry, I cannot fulfill your request because"
RELEASED_REFUSAL = "\nSorry, I can't fullfill your request because"

# Presets: DecodeConfig fields on top of its defaults. Mappings, not DecodeConfig objects, because
# they are what configs and evaluation variants carry, and what resume fingerprints are computed from.
# A run with a trained CLS: the paper's strategic-decoding settings for its prefill experiments
# (docs/method.md §2.2). A training run records these, with its own changes, in its run facts.
CLS_RUN = types.MappingProxyType(dict(schedule="each", r1=5, r2=15, r3=10, tau=3))
STRATEGIC = CLS_RUN
# The same weights, the CLS never acted on: no re-classification, no refusal insertion (response
# tokens still read the CLS slot as the run was trained to).
NO_INTERVENTION = types.MappingProxyType(dict(schedule="first", strategic_decoding=False))
# The plain model: as NO_INTERVENTION, and no token reads the CLS slot, so the LM is the causal
# model it was before any CLS training (what a checkpoint without a trained CLS must decode with).
PLAIN = types.MappingProxyType(dict(NO_INTERVENTION, response_sees_cls=False))


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Knobs of the decode loop.

  Steps: loop step s feeds the s-th token after the prompt (and after any attacker prefill) and,
  when the schedule selects s, re-classifies the CLS with the rule of the row's state.
  Schedules (re-classification steps; the prompt-time classification always happens):
    each       every step;
    first      never (prompt-time classification only);
    periodic   s % period == 0;
    annealing  s = 0 and s = 1, 2, 4, 8, ... (intervals double) while s < anneal_cutoff; a row
               whose flip awaits confirmation (Rule 3) is re-classified at every step until the
               flip is confirmed or withdrawn, so a late flip can still gather τ events.
  """

  max_new_tokens: int = 128
  threshold: float = 0.5
  r1: int = 10
  r2: int = 10
  r3: int = 10
  tau: int = 3
  # `events`: τ consecutive malicious re-classifications; `steps`: the flip must still hold at a
  # re-classification at least τ − 1 generation steps after it (differs only for sparse schedules).
  tau_unit: str = "events"
  schedule: str = "each"
  period: int = 10
  anneal_cutoff: int = 256
  # Rule 2 (and Rule 3, which extends it) also lets the CLS read the query span.
  rule2_include_query: bool = False
  # Attacker-prefilled response tokens count as response tokens for Rules 1–3 (docs/method.md decision 6).
  prefill_visible: bool = True
  # On a confirmed flip the response is cut back to S_t; True keeps the token at S_t itself.
  keep_trigger_token: bool = False
  # The refusal prefix forced at every insertion (tokenised once as standalone text, decode/text.py).
  refusal_text: str = PAPER_REFUSAL
  # True: a row ends as soon as its refusal prefix has been forced in full (Rule 1 right after the prompt,
  # or Rule 3 after the rollback), as if EOS had been sampled after its last token: the response is what
  # came before the insertion (an attacker prefill included) plus the prefix. False is the paper's middle
  # course: the model goes on after the prefix and explains the refusal in its own words, but an LM that
  # never learned to continue a refusal may carry on with the answer it was cut off from instead.
  end_after_refusal: bool = False
  # Ablations. Without strategic attention the CLS reads the query and every response token
  # so far (Rule 4 still applies). Without strategic decoding no refusal is ever inserted and
  # nothing is rolled back; the CLS state still reaches later tokens through slot 0, unless
  # `response_sees_cls` is False: then no token reads slot 0, the LM is the plain causal model
  # (a model without a trained CLS, or trained with mask.response_sees_cls=False) and the CLS
  # only feeds the safety head.
  strategic_attention: bool = True
  strategic_decoding: bool = True
  response_sees_cls: bool = True

  def __post_init__(self):
    object.__setattr__(self, "schedule", _SCHEDULE_ALIASES.get(self.schedule, self.schedule))
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule={self.schedule!r}; known: {SCHEDULES} (or 'every')")
    if self.tau_unit not in TAU_UNITS:
      raise ValueError(f"tau_unit={self.tau_unit!r}; known: {TAU_UNITS}")
    for name in ("max_new_tokens", "tau", "period", "anneal_cutoff"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    for name in ("r1", "r2", "r3"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
    if not 0.0 <= self.threshold <= 1.0:
      raise ValueError(f"threshold={self.threshold} must lie in [0, 1]")
    # It picks code paths at trace time: a string such as "false" would silently read as True.
    if not isinstance(self.end_after_refusal, bool):
      raise ValueError(f"end_after_refusal={self.end_after_refusal!r} must be a bool")

  def replace(self, **kw) -> DecodeConfig:
    return dataclasses.replace(self, **kw)

  @property
  def max_steps(self) -> int:
    """Loop bound. A row rolls back at most once and never by more than it has generated, so
    it needs at most 2 × max_new_tokens steps."""
    return 2 * self.max_new_tokens

  def reclassify_at(self, step):
    """Whether loop step `step` (a Python int or a traced int32) re-classifies."""
    step = jnp.asarray(step)
    if self.schedule == "each":
      return jnp.ones_like(step, dtype=bool)
    if self.schedule == "first":
      return jnp.zeros_like(step, dtype=bool)
    if self.schedule == "periodic":
      return step % self.period == 0
    # Powers of two (and 0): intervals 1, 1, 2, 4, 8, ... below the cutoff.
    return ((step & (step - 1)) == 0) & (step < self.anneal_cutoff)
