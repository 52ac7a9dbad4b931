"""GCG (Zou et al. 2023; docs/evaluation.md, "Attacks") in JAX, against our own model with its CLS path.

The row is `[CLS, BOS, template.., goal, suffix, template tail, target]`: the suffix sits inside
the user query, so the CLS judges it (Rule 4), and the target tokens are response rows that read
the CLS (unless the variant decodes with `response_sees_cls=False`), exactly as in the decode
loop's prompt pass. The objective is the mean cross-entropy of
the target; the adaptive variant adds `cls_weight · BCE(CLS, benign)`, which pushes the safety
head towards "benign" so strategic decoding is not triggered at the prompt.

One step: the gradient of the objective with respect to a one-hot encoding of every suffix
token, the top-k tokens per position by most negative gradient (non-ASCII and special tokens
excluded), `search_width` candidates that each change one position (round-robin) to a random
top-k token, candidates whose text does not re-encode to the same ids dropped (replaced by the
current suffix), and the candidate with the lowest exact objective kept.

The one-hot gradient needs embeddings as an input, which the model takes only as token ids; so
the suffix's L one-hot rows are appended to the embedding table as L extra "tokens" (ids V..V+L-1,
the CLS moving to V+L) and the LM head is padded to match, then sliced back to V.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from clsalign_jax import model as model_lib
from clsalign_jax.data.tokenizer import Tokenizer
from clsalign_jax.decode import bucket
from clsalign_jax.eval.lm import Encoded, TargetModel, next_token_logprobs, teacher_forced


@dataclasses.dataclass(frozen=True)
class GCGConfig:
  steps: int = 500
  suffix_tokens: int = 20
  init: str = " !"  # the suffix starts as this text's tokens repeated to suffix_tokens: " ! ! ! ..."
  top_k: int = 256
  search_width: int = 512  # candidates per step
  eval_batch_size: int = 64  # candidates per forward pass (memory)
  cls_weight: float = 0.0  # > 0: the adaptive variant
  allow_non_ascii: bool = False
  early_stop_loss: float = 0.0  # stop once the target cross-entropy falls below this
  seed: int = 0


@dataclasses.dataclass
class GCGResult:
  suffix_ids: list[int]
  suffix: str
  row: Encoded  # the optimised prompt, token-exact
  initial_loss: float  # objective of the initial suffix
  best_loss: float
  best_target_loss: float
  best_p_malicious: float
  steps: int
  losses: list[float]  # objective of the kept candidate after each step


def _objective(logits_BTV, labels_BT, input_len_B, prompt_len_B, cls_logit_B, cls_weight):
  """(objective, target cross-entropy) per row; target rows are [prompt_len, input_len)."""
  logp_BT = next_token_logprobs(logits_BTV, labels_BT)
  t_1T = jnp.arange(labels_BT.shape[1])[None]
  on_BT = (t_1T >= prompt_len_B[:, None] - 1) & (t_1T < input_len_B[:, None] - 1)
  ce_B = -jnp.sum(jnp.where(on_BT, logp_BT, 0.0), axis=1) / jnp.sum(on_BT, axis=1)
  return ce_B + cls_weight * jax.nn.softplus(cls_logit_B), ce_B


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _top_candidates(
  cfg: model_lib.ModelConfig,
  top_k: int,
  response_sees_cls: bool,
  params,
  tokens_T,
  suffix_start,
  input_len,
  prompt_len,
  query_span_2,
  suffix_L,
  cls_weight,
  blocked_V,
):
  """[L, top_k] token ids per suffix position with the most negative one-hot gradient."""
  V, L = cfg.vocab_size, suffix_L.shape[0]
  embed_VD = params["embedding"]

  def loss(onehot_LV):
    extra_LD = (onehot_LV @ embed_VD.astype(jnp.float32)).astype(embed_VD.dtype)
    wide = {**params, "embedding": jnp.concatenate([embed_VD, extra_LD])}
    if not cfg.tie_embeddings:
      wide["lm_head"] = jnp.pad(params["lm_head"], ((0, 0), (0, L)))
    inputs_T = jnp.where(tokens_T == V, V + L, tokens_T)
    inputs_T = inputs_T.at[suffix_start + jnp.arange(L)].set(V + jnp.arange(L))
    out = teacher_forced(
      model_lib.Transformer(cfg.replace(vocab_size=V + L)),
      wide,
      inputs_T[None],
      input_len[None],
      prompt_len[None],
      query_span_2[None],
      response_sees_cls,
    )
    total_B, _ = _objective(
      out.logits_BTV[..., :V], tokens_T[None], input_len[None], prompt_len[None], out.cls_logit_B, cls_weight
    )
    return total_B[0]

  grad_LV = jax.grad(loss)(jax.nn.one_hot(suffix_L, V, dtype=jnp.float32))
  grad_LV = jnp.where(blocked_V[None], jnp.inf, grad_LV)
  return jax.lax.top_k(-grad_LV, top_k)[1]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _candidate_objectives(
  cfg: model_lib.ModelConfig,
  response_sees_cls: bool,
  params,
  tokens_BT,
  input_len,
  prompt_len,
  query_span_2,
  cls_weight,
):
  B = tokens_BT.shape[0]
  rows = lambda x: jnp.broadcast_to(x, (B,) + x.shape)
  out = teacher_forced(
    model_lib.Transformer(cfg),
    params,
    tokens_BT,
    rows(input_len),
    rows(prompt_len),
    rows(query_span_2),
    response_sees_cls,
  )
  total_B, ce_B = _objective(out.logits_BTV, tokens_BT, rows(input_len), rows(prompt_len), out.cls_logit_B, cls_weight)
  return total_B, ce_B, jax.nn.sigmoid(out.cls_logit_B)


def blocked_tokens(tokenizer: Tokenizer, allow_non_ascii: bool) -> np.ndarray:
  """[V] True for ids a suffix may not use: special tokens and, by default, any token whose
  text is empty, non-ASCII or unprintable (partial UTF-8 bytes decode to U+FFFD)."""
  blocked = np.zeros(tokenizer.vocab_size, bool)
  for i in range(tokenizer.vocab_size):
    if tokenizer.is_special(i):
      blocked[i] = True
    elif not allow_non_ascii:
      text = tokenizer.decode_fragment([i])
      blocked[i] = not (text and text.isascii() and text.isprintable())
  return blocked


class GCG:
  """Optimises one suffix per (goal, target) against `model`."""

  def __init__(self, model: TargetModel, config: GCGConfig = GCGConfig(), blocked_V: np.ndarray | None = None):
    self.model, self.config = model, config
    if blocked_V is None:
      blocked_V = blocked_tokens(model.tokenizer, config.allow_non_ascii)
    self.blocked_V = jnp.asarray(blocked_V)

  def run(self, goal: str, target: str) -> GCGResult:
    cfg, model, tok = self.config, self.model, self.model.tokenizer
    L = cfg.suffix_tokens
    init = (tok.encode_continuation(cfg.init) * L)[:L]
    if not init:
      raise ValueError("GCG init text is empty")
    enc = model.encode(goal)
    q0, q1 = enc.query_span
    target_ids = tok.encode_continuation(model.template.response_prefix + target)
    prompt_len = len(enc.prompt) + L
    input_len = prompt_len + len(target_ids)
    base_T = np.zeros(bucket(input_len), np.int32)
    base_T[:input_len] = list(enc.prompt[:q1]) + init + list(enc.prompt[q1:]) + target_ids
    span_2 = np.asarray([q0, q1 + L], np.int32)
    lens = (jnp.int32(input_len), jnp.int32(prompt_len), jnp.asarray(span_2))
    w = jnp.float32(cfg.cls_weight)
    sees_cls = model.dcfg.response_sees_cls

    def evaluate(cands_NL):
      out = [], [], []
      E = cfg.eval_batch_size
      for k in range(0, len(cands_NL), E):
        chunk = cands_NL[k : k + E]
        tokens_BT = np.tile(base_T, (E, 1))
        tokens_BT[: len(chunk), q1 : q1 + L] = chunk
        tokens_BT[len(chunk) :, q1 : q1 + L] = chunk[0]
        scored = _candidate_objectives(model.cfg, sees_cls, model.params, tokens_BT, *lens, w)
        for acc, x in zip(out, jax.device_get(scored)):
          acc.append(x[: len(chunk)])
      return [np.concatenate(x) for x in out]

    rng = np.random.default_rng(cfg.seed)
    suffix_L = np.asarray(init, np.int32)
    total, ce, p = evaluate(suffix_L[None])
    initial = best = float(total[0])
    best_suffix, best_ce, best_p = suffix_L, float(ce[0]), float(p[0])
    losses, steps = [], 0
    while steps < cfg.steps and not best_ce < cfg.early_stop_loss:
      tokens_T = base_T.copy()
      tokens_T[q1 : q1 + L] = suffix_L
      top_LK = np.asarray(
        _top_candidates(
          model.cfg, cfg.top_k, sees_cls, model.params, tokens_T, jnp.int32(q1), *lens, suffix_L, w, self.blocked_V
        )
      )
      cands_NL = self._candidates(suffix_L, top_LK, rng)
      total, ce, p = evaluate(cands_NL)
      i = int(np.argmin(total))
      suffix_L = cands_NL[i]
      losses.append(float(total[i]))
      steps += 1
      if total[i] < best:
        best, best_suffix, best_ce, best_p = float(total[i]), suffix_L, float(ce[i]), float(p[i])
    prompt = tuple(enc.prompt[:q1]) + tuple(int(t) for t in best_suffix) + tuple(enc.prompt[q1:])
    return GCGResult(
      suffix_ids=best_suffix.tolist(),
      suffix=tok.decode_fragment(best_suffix.tolist()),
      row=Encoded(prompt, (q0, q1 + L)),
      initial_loss=initial,
      best_loss=best,
      best_target_loss=best_ce,
      best_p_malicious=best_p,
      steps=steps,
      losses=losses,
    )

  def _candidates(self, suffix_L: np.ndarray, top_LK: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    tok = self.model.tokenizer
    N, (L, K) = self.config.search_width, top_LK.shape
    pos_N = (np.arange(N) * L) // N
    cands_NL = np.tile(suffix_L, (N, 1))
    cands_NL[np.arange(N), pos_N] = top_LK[pos_N, rng.integers(0, K, N)]
    # A suffix that another tokenisation would read differently cannot be replayed as text.
    for n in range(N):
      ids = cands_NL[n].tolist()
      if tok.encode_continuation(tok.decode_fragment(ids)) != ids:
        cands_NL[n] = suffix_L
    return cands_NL
