"""The safe model of a clsalign-jax export in transformers: the [CLS] safety head and strategic decoding.

An export of a trained run loads in transformers as its plain language model, which is not the safe
model (the CLS and strategic decoding are what refuse). This module is the safe one, in torch:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exports/smollm2_135m", trust_remote_code=True)
    # or, without remote code:  from clsalign_jax.interop.hf_strategic import ClsAlignForCausalLM
    #                           model = ClsAlignForCausalLM.from_pretrained("exports/smollm2_135m")
    model.classify([{"role": "user", "content": "How do I bake bread?"}])  # p(malicious)
    out = model.generate(messages=[{"role": "user", "content": "..."}], max_new_tokens=64)

`convert` copies this file into every HF export as `modeling_clsalign.py` (config.json's `auto_map`
points at it), so it imports nothing from clsalign-jax: only torch, transformers and safetensors.
The safe class of an export is `ClsAlign` + its transformers architecture (`ClsAlignQwen2ForCausalLM`
on `Qwen2ForCausalLM`), built on first use by `safe_class`: any Llama-shaped architecture (RMSNorm,
rotate-half RoPE, SwiGLU, GQA, biases at most on q/k/v) needs no code here.

It re-implements, independently of the JAX code, what clsalign-jax's decode loop does
(docs/method.md §1–§3): the [CLS] row at slot 0 (its own embedding, the optional side path of
residual adapters and an early exit, the fp32 head), the attention rules of the prompt pass, of
generated tokens and of a re-classifying CLS (Rules 1–4), and the per-row state machine (flip,
τ confirmation, withdrawal, rollback to S_t, teacher-forced refusal prefix, `end_after_refusal`).
The settings come from config.json's `clsalign` block, which `convert` writes from the run's facts.

The KV cache is a fixed array of slots per layer, not transformers' append-only cache: a
re-classification overwrites the CLS keys and values in slot 0 (tokens generated earlier keep what
they computed against the older state) and a rollback shortens the row, whose stale slots are
masked and later overwritten. Rows are decoded one at a time; a simple loop, not a fast one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

CLS_FILE = "clsalign_cls.safetensors"
CONFIG_KEY = "clsalign"  # the block of config.json this module reads
FORMAT_VERSION = 1

# Row states: the rule the CLS follows, or CONFIRMED (a confirmed flip: no more re-classification).
CONFIRMED, MALICIOUS, BENIGN, TRANSITION = 0, 1, 2, 3

# Decode settings, as clsalign-jax's DecodeConfig names them; config.json holds every one of them.
DECODE_FIELDS = (
  "max_new_tokens",
  "threshold",
  "r1",
  "r2",
  "r3",
  "tau",
  "tau_unit",
  "schedule",
  "period",
  "anneal_cutoff",
  "rule2_include_query",
  "prefill_visible",
  "keep_trigger_token",
  "refusal_text",
  "end_after_refusal",
  "strategic_attention",
  "strategic_decoding",
  "response_sees_cls",
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """config.json's `clsalign` block, checked. `decode`: every DecodeConfig field of the run's
  strategic decoding; `refusal_ids`: the refusal prefix as clsalign-jax tokenises it (standalone
  text); `end_token_id`: the chat template's end token (generation stops there);
  `query_prefix_ids` / `query_suffix_ids`: the template's tokens before and after the user query
  (without [CLS]), to find the query in ids that `apply_chat_template` produced."""

  cls_token_id: int
  decode: dict
  exit_layer: int = 0
  adapter_rank: int = 0
  refusal_ids: tuple[int, ...] | None = None
  end_token_id: int | None = None
  query_prefix_ids: tuple[int, ...] | None = None
  query_suffix_ids: tuple[int, ...] | None = None
  template: str | None = None

  @classmethod
  def from_config(cls, config, source: str = "config.json") -> Settings:
    block = getattr(config, CONFIG_KEY, None)
    if not isinstance(block, dict):
      raise ValueError(  # noqa: TRY004 - a missing block is bad input, as every other check here
        f"{source}: no '{CONFIG_KEY}' block; this is not a clsalign-jax export (python -m clsalign_jax.convert writes it)"
      )
    if block.get("format_version") != FORMAT_VERSION:
      raise ValueError(
        f"{source}: {CONFIG_KEY}.format_version={block.get('format_version')!r}; this reads {FORMAT_VERSION}"
      )
    decode = dict(block.get("decode") or {})
    missing = [k for k in DECODE_FIELDS if k not in decode]
    if missing:
      raise ValueError(f"{source}: {CONFIG_KEY}.decode lacks {missing}")
    if decode["schedule"] not in ("each", "first", "periodic", "annealing"):
      raise ValueError(f"{source}: {CONFIG_KEY}.decode.schedule={decode['schedule']!r} is unknown")
    if decode["tau_unit"] not in ("events", "steps"):
      raise ValueError(f"{source}: {CONFIG_KEY}.decode.tau_unit={decode['tau_unit']!r} is unknown")
    side = block.get("side_path") or {}
    ids = lambda key: None if block.get(key) is None else tuple(int(i) for i in block[key])
    return cls(
      cls_token_id=int(block["cls_token_id"]),
      decode=decode,
      exit_layer=int(side.get("exit_layer", 0)),
      adapter_rank=int(side.get("adapter_rank", 0)),
      refusal_ids=ids("refusal_ids"),
      end_token_id=None if block.get("end_token_id") is None else int(block["end_token_id"]),
      query_prefix_ids=ids("query_prefix_ids"),
      query_suffix_ids=ids("query_suffix_ids"),
      template=block.get("template"),
    )


class _Adapter(nn.Module):
  """The CLS row's residual adapter after one decoder layer: up(silu(down(norm(x))))."""

  def __init__(self, d_model: int, rank: int, norm: nn.Module):
    super().__init__()
    self.norm = norm
    self.down = nn.Linear(d_model, rank, bias=False)
    self.up = nn.Linear(rank, d_model, bias=False)

  def forward(self, x):
    return self.up(nn.functional.silu(self.down(self.norm(x))))


class ClsExtras(nn.Module):
  """The [CLS] input row, the safety head and the side path; parameter names are the tensor names
  of `clsalign_cls.safetensors`, so that file loads with `load_state_dict(strict=True)`."""

  def __init__(self, d_model: int, settings: Settings, n_layers: int, make_norm):
    super().__init__()
    self.cls_embedding = nn.Parameter(torch.zeros(d_model))
    self.cls_head = nn.Linear(d_model, 1)
    cls_layers = settings.exit_layer or n_layers
    rank = settings.adapter_rank
    self.cls_adapter = nn.ModuleList([_Adapter(d_model, rank, make_norm()) for _ in range(cls_layers if rank else 0)])
    self.cls_norm = make_norm() if settings.exit_layer else None


@dataclasses.dataclass
class StrategicRow:
  """One generated row in response coordinates (index 0 = first response token, the first
  attacker-prefill token when there is one), as clsalign-jax's RowResult."""

  response_ids: list[int]
  prefill_len: int
  p_initial: float
  initial_malicious: bool
  trace: list[tuple[int, int, float]]  # (loop step, response index of the fed token, p) per re-classification
  trigger_step: int  # -1: no confirmed flip
  trigger_index: int  # S_t as a response index; -1 if none
  insert_index: int  # where the refusal prefix starts in response_ids; -1 if none
  false_alarms: int


@dataclasses.dataclass
class StrategicOutput:
  """`generate(..., return_dict_in_generate=True)`: `sequences` as plain generate returns them
  (each input row followed by its response, right-padded), and the per-row results."""

  sequences: torch.Tensor
  rows: list[StrategicRow]


@dataclasses.dataclass
class _Row:
  """The per-row state machine (clsalign-jax decode/loop.py RowState), for one row."""

  length: int  # slot of the pending token (fed at the next step)
  done: bool
  mode: int
  trigger_pos: int = -1
  trigger_step: int = -1
  malicious_run: int = 0
  refusal_next: int = 0
  insert_pos: int = -1
  false_alarms: int = 0


class _SlotCache:
  """Keys and values by slot: [G, S, H] per layer; the token at position p lives in slot p and the
  CLS in slot 0."""

  def __init__(self, n_layers: int, n_kv_heads: int, slots: int, head_dim: int, dtype, device):
    shape = (n_layers, n_kv_heads, slots, head_dim)
    self.k = torch.zeros(shape, dtype=dtype, device=device)
    self.v = torch.zeros(shape, dtype=dtype, device=device)


def _rotate_half(x):
  half = x.shape[-1] // 2
  return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class ClsAlignMixin:
  """The safe model on top of a Llama-shaped transformers causal LM (`safe_class` builds
  `ClsAlignLlamaForCausalLM`, `ClsAlignQwen2ForCausalLM`, ...). `forward` stays the plain LM;
  `classify` and `generate` are the safe model."""

  # Set by load_clsalign: `clsalign` (a ClsExtras submodule) and `clsalign_settings`.
  _clsalign_tokenizer = None

  # ----- loading -----------------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
    """The LM as transformers loads it, then the [CLS] extras from `clsalign_cls.safetensors`."""
    hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
    model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
    model.load_clsalign(_resolve(pretrained_model_name_or_path, CLS_FILE, hub))
    return model

  def load_clsalign(self, cls_file: str) -> None:
    """Attach the [CLS] extras read from `cls_file` (a `clsalign_cls.safetensors`)."""
    settings = Settings.from_config(self.config, f"{self.name_or_path}/config.json")
    norm_type = type(self.model.norm)
    eps = self.config.rms_norm_eps
    D = self.config.hidden_size
    extras = ClsExtras(D, settings, self.config.num_hidden_layers, lambda: norm_type(D, eps=eps))
    tensors = load_file(cls_file)
    try:
      extras.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
      raise ValueError(
        f"{cls_file}: does not match the side path in config.json ({CONFIG_KEY}.side_path): {e}"
      ) from None
    embed = self.get_input_embeddings().weight
    extras.to(device=embed.device, dtype=embed.dtype)
    extras.cls_head.float()  # the head runs in fp32, whatever the LM's dtype
    self.clsalign, self.clsalign_settings = extras, settings

  def _settings(self) -> Settings:
    if getattr(self, "clsalign", None) is None:
      raise ValueError("no [CLS] extras loaded: use from_pretrained on a clsalign-jax export (or load_clsalign)")
    return self.clsalign_settings

  # ----- inputs ------------------------------------------------------------------------------

  def _tokenizer(self, tokenizer):
    if tokenizer is not None:
      return tokenizer
    if self._clsalign_tokenizer is None:
      from transformers import AutoTokenizer

      self._clsalign_tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
    return self._clsalign_tokenizer

  def encode_messages(self, messages, tokenizer=None) -> list[list[int]]:
    """Prompt ids (no [CLS]) of one conversation (a list of messages) or of a batch of them, as the
    export's chat template renders them with the generation prompt."""
    conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
    tok = self._tokenizer(tokenizer)
    out = []
    for conversation in conversations:
      ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
      ids = ids["input_ids"] if hasattr(ids, "keys") else ids
      out.append([int(i) for i in ids])
    return out

  def query_span(self, ids: Sequence[int]) -> tuple[int, int]:
    """Half-open span of the user query in `[CLS] + ids`, from the template's tokens around it."""
    s = self._settings()
    if s.query_prefix_ids is None or s.query_suffix_ids is None:
      raise ValueError("the export records no template tokens (no tokenizer at convert time): pass query_spans")
    pre, suf = list(s.query_prefix_ids), list(s.query_suffix_ids)
    ids = list(ids)
    if ids[: len(pre)] != pre or ids[len(ids) - len(suf) :] != suf or len(ids) <= len(pre) + len(suf):
      raise ValueError(
        f"prompt ids do not have the {s.template or 'export'} template's tokens around the query "
        f"(expected {pre[:8]}... before it and ...{suf[-8:]} after it; a query whose edges merge with the "
        "template text tokenises differently): pass query_spans"
      )
    return 1 + len(pre), 1 + len(ids) - len(suf)

  def _rows(self, input_ids, attention_mask, messages, query_spans, tokenizer) -> tuple[list[list[int]], list]:
    """Prompt ids per row (padding and any leading [CLS] removed) and each row's query span."""
    if messages is not None:
      if input_ids is not None:
        raise ValueError("pass input_ids or messages, not both")
      rows = self.encode_messages(messages, tokenizer)
    elif input_ids is None:
      raise ValueError("pass input_ids or messages")
    else:
      ids = _as_rows(input_ids)
      if attention_mask is not None:
        ids = [[t for t, m in zip(r, k) if m] for r, k in zip(ids, _as_rows(attention_mask))]
      cls_id = self._settings().cls_token_id
      rows = [r[1:] if r and r[0] == cls_id else r for r in ids]
    if query_spans is None:
      spans = [self.query_span(r) for r in rows]
    else:
      spans = [tuple(int(x) for x in q) for q in query_spans]
      if len(spans) != len(rows):
        raise ValueError(f"{len(spans)} query_spans for {len(rows)} rows")
    return rows, spans

  # ----- the forward pass --------------------------------------------------------------------

  def _forward(self, tokens, positions, slots, mask_TS, cache: _SlotCache, lm_rows, cls_rows):
    """Run rows `tokens` at `positions`, writing their keys and values into `slots` first; row t
    attends to the slots `mask_TS[t]` allows. Returns LM logits of `lm_rows` and the CLS logits
    (fp32) of `cls_rows`."""
    cfg, extras = self.config, self.clsalign
    settings = self.clsalign_settings
    backbone = self.model
    device = self.get_input_embeddings().weight.device
    ids = torch.tensor(tokens, device=device)
    is_cls = (ids == settings.cls_token_id)[:, None]
    x = backbone.embed_tokens(ids.clamp(max=cfg.vocab_size - 1))
    x = torch.where(is_cls, extras.cls_embedding.to(x.dtype), x)
    T = len(tokens)
    N, G = cfg.num_attention_heads, cfg.num_key_value_heads
    H = getattr(cfg, "head_dim", None) or cfg.hidden_size // N
    # RoPE tables and rotation in fp32 (a probe tensor of that dtype), cast back after.
    probe = torch.zeros((), dtype=torch.float32, device=device)
    cos, sin = backbone.rotary_emb(probe, torch.tensor(positions, device=device)[None])
    cos, sin = cos[0], sin[0]  # [T, H]
    slot_idx = torch.tensor(slots, device=device)
    mask = mask_TS.to(device)
    cls_layers = settings.exit_layer or cfg.num_hidden_layers
    cls_x = None
    for i, layer in enumerate(backbone.layers):
      attn = layer.self_attn
      h = layer.input_layernorm(x)
      # The family's own projections, so q/k/v biases (Qwen2) come with them.
      q = attn.q_proj(h).view(T, N, H).transpose(0, 1)
      k = attn.k_proj(h).view(T, G, H).transpose(0, 1)
      v = attn.v_proj(h).view(T, G, H).transpose(0, 1)
      q = (q.float() * cos + _rotate_half(q.float()) * sin).to(q.dtype)
      k = (k.float() * cos + _rotate_half(k.float()) * sin).to(k.dtype)
      cache.k[i][:, slot_idx] = k.to(cache.k.dtype)
      cache.v[i][:, slot_idx] = v.to(cache.v.dtype)
      keys = cache.k[i].to(x.dtype).repeat_interleave(N // G, dim=0)  # [N, S, H]
      values = cache.v[i].to(x.dtype).repeat_interleave(N // G, dim=0)
      scores = torch.einsum("nth,nsh->nts", q.float(), keys.float()) / math.sqrt(H)
      scores = scores.masked_fill(~mask[None], torch.finfo(torch.float32).min)
      probs = torch.softmax(scores, dim=-1).to(x.dtype)
      out = torch.einsum("nts,nsh->tnh", probs, values).reshape(T, N * H)
      x = x + attn.o_proj(out)
      x = x + layer.mlp(layer.post_attention_layernorm(x))
      if extras.cls_adapter and i < cls_layers:
        x = torch.where(is_cls, x + extras.cls_adapter[i](x), x)
      if i + 1 == settings.exit_layer:
        cls_x = x
    final = backbone.norm(x)
    logits = self.lm_head(final[list(lm_rows)]).float() if lm_rows else None
    cls_logits = None
    if cls_rows:
      cls_h = extras.cls_norm(cls_x) if settings.exit_layer else final
      cls_logits = extras.cls_head(cls_h[list(cls_rows)].float())[:, 0]
    return logits, cls_logits

  # ----- masks (docs/method.md §2.2) ---------------------------------------------------------

  def _window(self):
    return getattr(self.config, "sliding_window", None)

  def _prefill_mask(self, input_len: int, prompt_len: int, span, slots: int, response_sees_cls: bool):
    """The prompt pass: the CLS reads itself and the query (Rule 4); prompt rows read earlier
    tokens, not the CLS; attacker-prefilled response rows read the CLS too."""
    i = torch.arange(input_len)[:, None]
    j = torch.arange(slots)[None, :]
    tokens = (j >= 1) & (j <= i)
    window = self._window()
    if window is not None:
      tokens &= (i - j) < window
    reads_cls = (j == 0) & (i >= prompt_len) & response_sees_cls
    mask = (tokens | reads_cls) & (i >= 1)
    mask[0] = (j[0] == 0) | ((j[0] >= span[0]) & (j[0] < span[1]))
    return mask

  def _token_mask(self, pos: int, slots: int, response_sees_cls: bool):
    """A generated token: every filled slot up to its own (slot 0 too, unless response tokens
    are blind to the CLS), within the sliding window for token pairs."""
    j = torch.arange(slots)
    mask = j <= pos
    window = self._window()
    if window is not None:
      mask &= ((pos - j) < window) | (j == 0)
    if not response_sees_cls:
      mask &= j > 0
    return mask

  def _cls_mask(self, row: _Row, pos: int, span, visible_start: int, slots: int, d: dict):
    """A re-classifying CLS: itself, never the template (Rule 4), and by the row's rule: Rule 1 the
    query and the first r1 response tokens; Rule 2 the latest r2; Rule 3 the tokens in
    (S_t - r2, S_t + r3]; the query too in Rules 2-3 under rule2_include_query."""
    j = torch.arange(slots)
    query = (j >= span[0]) & (j < span[1])
    response = (j >= visible_start) & (j <= pos)
    if not d["strategic_attention"]:
      return (j == 0) | query | response
    if row.mode == MALICIOUS:
      chosen = query | (response & (j < visible_start + d["r1"]))
    elif row.mode == TRANSITION:
      chosen = response & (j > row.trigger_pos - d["r2"]) & (j <= row.trigger_pos + d["r3"])
    else:
      chosen = response & (j > pos - d["r2"])
    if row.mode != MALICIOUS and d["rule2_include_query"]:
      chosen |= query
    return (j == 0) | chosen

  # ----- classification ----------------------------------------------------------------------

  @torch.no_grad()
  def classify(self, messages=None, *, input_ids=None, attention_mask=None, query_spans=None, tokenizer=None):
    """Prompt-time p(malicious) (the CLS reads the query only): a float for one conversation or
    one row of ids, a list for a batch. Malicious when p > config.clsalign.decode.threshold."""
    single = (messages is not None and messages and isinstance(messages[0], dict)) or (
      input_ids is not None and _is_single(input_ids)
    )
    rows, spans = self._rows(input_ids, attention_mask, messages, query_spans, tokenizer)
    d = self._settings().decode
    out = []
    for ids, span in zip(rows, spans):
      tokens = [self.clsalign_settings.cls_token_id, *ids]
      T = len(tokens)
      cache = self._new_cache(T)
      mask = self._prefill_mask(T, T, span, T, d["response_sees_cls"])
      _, cls_logit = self._forward(tokens, list(range(T)), list(range(T)), mask, cache, [], [0])
      out.append(float(torch.sigmoid(cls_logit[0])))
    return out[0] if single else out

  # ----- strategic decoding ------------------------------------------------------------------

  def _new_cache(self, slots: int) -> _SlotCache:
    cfg = self.config
    H = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = self.get_input_embeddings().weight
    return _SlotCache(cfg.num_hidden_layers, cfg.num_key_value_heads, slots, H, w.dtype, w.device)

  def _pick(self, logits, sampling: dict, generator) -> int:
    """Greedy, or a draw after temperature, top-k and top-p (kept as transformers keeps them)."""
    if not sampling["do_sample"]:
      return int(torch.argmax(logits))
    logits = logits / max(sampling["temperature"], 1e-6)
    if sampling["top_k"] and sampling["top_k"] > 0:
      kth = torch.topk(logits, min(sampling["top_k"], logits.shape[-1])).values[-1]
      logits = logits.masked_fill(logits < kth, -math.inf)
    if sampling["top_p"] < 1.0:
      sorted_logits, order = torch.sort(logits, descending=True)
      probs = torch.softmax(sorted_logits, dim=-1)
      drop = (torch.cumsum(probs, dim=-1) - probs) >= sampling["top_p"]
      drop[0] = False
      logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))

  @torch.no_grad()
  def _decode_row(self, prompt, prefill, span, d: dict, refusal, eos, sampling, generator) -> StrategicRow:
    """clsalign-jax's decode loop for one row: prompt pass, then one fed token per loop step with
    the CLS re-read on the steps the schedule and the row's state select."""
    cls_id = self.clsalign_settings.cls_token_id
    R = len(refusal)
    prompt_len = 1 + len(prompt)
    input_len = prompt_len + len(prefill)
    max_new = d["max_new_tokens"]
    visible_start = prompt_len if d["prefill_visible"] else input_len
    S = input_len + max_new
    seq = [cls_id, *prompt, *prefill] + [0] * max_new
    cache = self._new_cache(S)
    thr = d["threshold"]
    see = d["response_sees_cls"]

    mask = self._prefill_mask(input_len, prompt_len, span, S, see)
    logits, cls_logit = self._forward(
      seq[:input_len], list(range(input_len)), list(range(input_len)), mask, cache, [input_len - 1], [0]
    )
    p0 = float(torch.sigmoid(cls_logit[0]))
    malicious0 = p0 > thr
    refuse0 = malicious0 and d["strategic_decoding"]
    first = refusal[0] if refuse0 else self._pick(logits[0], sampling, generator)
    seq[input_len] = first
    row = _Row(
      length=input_len,
      done=(not refuse0 and first == eos) or (refuse0 and R == 1 and d["end_after_refusal"]) or max_new <= 1,
      mode=MALICIOUS if malicious0 else BENIGN,
      refusal_next=1 if refuse0 else R,
      insert_pos=input_len if refuse0 else -1,
    )
    trace = []
    for step in range(2 * max_new):  # a row rolls back at most once: 2 x max_new_tokens bounds it
      if row.done:
        break
      pos = row.length
      judged = self._wants_cls(row, visible_start, d) and self._due(row, step, d)
      tok_mask = self._token_mask(pos, S, see)
      if judged:
        mask = torch.stack([tok_mask, self._cls_mask(row, pos, span, visible_start, S, d)])
        logits, cls_logit = self._forward([seq[pos], cls_id], [pos, 0], [pos, 0], mask, cache, [0], [1])
        p = float(torch.sigmoid(cls_logit[0]))
        trace.append((step, pos - prompt_len, p))
      else:
        logits, _ = self._forward([seq[pos]], [pos], [pos], tok_mask[None], cache, [0], [])
        p = None
      sampled = self._pick(logits[0], sampling, generator)
      token = self._transition(row, step, judged, judged and p > thr, sampled, refusal, eos, input_len, d)
      if row.length < len(seq):
        seq[row.length] = token
    confirmed = row.mode == CONFIRMED
    rel = lambda slot: slot - prompt_len if slot >= 0 else -1
    return StrategicRow(
      response_ids=seq[prompt_len : row.length + 1],
      prefill_len=len(prefill),
      p_initial=p0,
      initial_malicious=malicious0,
      trace=trace,
      trigger_step=row.trigger_step if confirmed else -1,
      trigger_index=rel(row.trigger_pos) if confirmed else -1,
      insert_index=rel(row.insert_pos),
      false_alarms=row.false_alarms,
    )

  @staticmethod
  def _wants_cls(row: _Row, visible_start: int, d: dict) -> bool:
    """Whether re-reading the CLS could change it (a Rule-1 window stops growing after r1 tokens)."""
    rule1_open = row.length < visible_start + d["r1"] or not d["strategic_attention"]
    return not row.done and row.mode != CONFIRMED and (row.mode != MALICIOUS or rule1_open)

  @staticmethod
  def _due(row: _Row, step: int, d: dict) -> bool:
    """Whether the schedule re-reads at loop step `step`; under annealing a row in Rule 3 at every step."""
    schedule = d["schedule"]
    if schedule == "each":
      return True
    if schedule == "first":
      return False
    if schedule == "periodic":
      return step % d["period"] == 0
    return ((step & (step - 1)) == 0 and step < d["anneal_cutoff"]) or row.mode == TRANSITION

  @staticmethod
  def _transition(row: _Row, step, judged, malicious, sampled, refusal, eos, input_len, d) -> int:
    """One loop step of the state machine (docs/method.md §3.2); updates `row`, returns the next
    pending token. Rule 2 -> 3 on a malicious verdict; in Rule 3 a malicious verdict counts
    towards τ, a benign one withdraws the flip; once τ holds the row is cut back to S_t and the
    refusal prefix is forced from there."""
    R = len(refusal)
    pos = row.length
    flips = row.mode == BENIGN and malicious
    was_transition = row.mode == TRANSITION
    withdrawn = was_transition and judged and not malicious
    if flips:
      row.trigger_pos, row.trigger_step, row.malicious_run, row.mode = pos, step, 1, TRANSITION
    elif was_transition and malicious:
      row.malicious_run += 1
    elif withdrawn:
      row.trigger_pos, row.trigger_step, row.malicious_run, row.mode = -1, -1, 0, BENIGN
      row.false_alarms += 1
    if d["tau_unit"] == "events":
      held = row.malicious_run >= d["tau"]
    else:
      held = step - row.trigger_step + 1 >= d["tau"]
    confirmed = (flips or (was_transition and malicious)) and held
    if confirmed:
      row.mode = CONFIRMED
    rollback = confirmed and d["strategic_decoding"]
    forcing = row.refusal_next < R
    if rollback:
      token, row.refusal_next = refusal[0], 1
      row.length = row.trigger_pos + int(d["keep_trigger_token"])
      row.insert_pos = row.length
    elif forcing:
      token = refusal[row.refusal_next]
      row.refusal_next += 1
      row.length = pos + 1
    else:
      token = sampled
      row.length = pos + 1
    refusal_ends = (rollback or forcing) and row.refusal_next == R and d["end_after_refusal"]
    eos_sampled = not rollback and not forcing and token == eos
    row.done = eos_sampled or refusal_ends or row.length + 1 - input_len >= d["max_new_tokens"]
    return token

  @torch.no_grad()
  def generate(
    self,
    input_ids=None,
    attention_mask=None,
    *,
    messages=None,
    query_spans=None,
    prefill_ids=None,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generation_config=None,
    strategic: bool = True,
    return_dict_in_generate: bool = False,
    tokenizer=None,
    clsalign_decode: dict | None = None,
    **kwargs,
  ):
    """Strategic decoding with the run's settings (config.json `clsalign.decode`), one row at a time.

    input_ids (+ attention_mask, either padding side) or messages (one conversation or a batch):
    the prompts, with or without a leading [CLS]. query_spans: the user query's token span per row
    in [CLS] + ids coordinates (default: found from the template's tokens around it). prefill_ids:
    attacker-prefilled response tokens per row. clsalign_decode: decode settings over the run's
    (e.g. {"schedule": "first"}). Sampling arguments default to generation_config.json (greedy).
    Returns each input row followed by its response, right-padded with pad_token_id (a
    StrategicOutput with the per-row CLS trace and insertions when return_dict_in_generate).
    `strategic=False` is transformers' own generate: the plain LM, not the safe model.
    """
    if not strategic:
      named = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "return_dict_in_generate": return_dict_in_generate or None,
      }
      named = {k: v for k, v in named.items() if v is not None}
      return super().generate(
        input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config, **named, **kwargs
      )
    if kwargs:
      raise TypeError(f"generate: unsupported arguments {sorted(kwargs)} for strategic decoding")
    settings = self._settings()
    d = dict(settings.decode)
    unknown = sorted(set(clsalign_decode or {}) - set(DECODE_FIELDS))
    if unknown:
      raise TypeError(f"clsalign_decode: unknown decode settings {unknown}; known: {list(DECODE_FIELDS)}")
    d.update(clsalign_decode or {})
    gen = generation_config or self.generation_config
    pick = lambda value, name, default: value if value is not None else getattr(gen, name, None) or default
    d["max_new_tokens"] = int(pick(max_new_tokens, "max_new_tokens", d["max_new_tokens"]))
    if d["max_new_tokens"] < 1:
      raise ValueError(f"max_new_tokens={d['max_new_tokens']} must be >= 1")
    sampling = {
      "do_sample": bool(pick(do_sample, "do_sample", False)),
      "temperature": float(pick(temperature, "temperature", 1.0)),
      "top_k": int(pick(top_k, "top_k", 0)),
      "top_p": float(pick(top_p, "top_p", 1.0)),
    }
    eos = eos_token_id if eos_token_id is not None else settings.end_token_id
    if eos is None:
      eos = gen.eos_token_id[0] if isinstance(gen.eos_token_id, list) else gen.eos_token_id
    refusal = list(settings.refusal_ids or ())
    if not refusal:
      if d["strategic_decoding"]:
        raise ValueError("the export records no refusal_ids (no tokenizer at convert time)")
      refusal = [0]  # never forced without strategic decoding
    rows, spans = self._rows(input_ids, attention_mask, messages, query_spans, tokenizer)
    prefills = [list(p) for p in prefill_ids] if prefill_ids is not None else [[] for _ in rows]
    if len(prefills) != len(rows):
      raise ValueError(f"{len(prefills)} prefill_ids rows for {len(rows)} prompts")
    generator = torch.Generator().manual_seed(seed) if sampling["do_sample"] else None
    results = [
      self._decode_row(ids, pre, span, d, refusal, eos, sampling, generator)
      for ids, pre, span in zip(rows, prefills, spans)
    ]
    heads = _as_rows(input_ids) if input_ids is not None else rows
    pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
    pad = eos if pad is None else pad
    full = [list(h) + r.response_ids for h, r in zip(heads, results)]
    width = max(len(f) for f in full)
    device = self.get_input_embeddings().weight.device
    sequences = torch.tensor([f + [pad] * (width - len(f)) for f in full], dtype=torch.long, device=device)
    return StrategicOutput(sequences, results) if return_dict_in_generate else sequences


def _as_rows(x) -> list[list[int]]:
  """A tensor or (nested) list of ids as a list of rows of ints."""
  rows = x.tolist() if torch.is_tensor(x) else [list(r) if isinstance(r, (list, tuple)) else r for r in x]
  rows = [rows] if rows and not isinstance(rows[0], list) else rows
  return [[int(t) for t in r] for r in rows]


def _is_single(input_ids) -> bool:
  if torch.is_tensor(input_ids):
    return input_ids.dim() == 1
  return not input_ids or not isinstance(input_ids[0], (list, tuple))


def _resolve(name_or_path, filename: str, hub: dict) -> str:
  """The local path of `filename` in an export directory or a Hub repository."""
  local = os.path.join(str(name_or_path), filename)
  if os.path.isfile(local):
    return local
  from transformers.utils import cached_file

  return cached_file(name_or_path, filename, **hub)


SAFE_CLASS_PREFIX = "ClsAlign"
_SAFE_CLASSES: dict[str, type] = {}


def safe_class(architecture: str) -> type:
  """The safe class on transformers' class `architecture` (config.json's `architectures` entry,
  e.g. "Qwen2ForCausalLM"), named `ClsAlign` + architecture; built once, then the same class."""
  if architecture not in _SAFE_CLASSES:
    base = getattr(transformers, architecture, None) if architecture.endswith("ForCausalLM") else None
    if not (isinstance(base, type) and issubclass(base, transformers.PreTrainedModel)):
      raise ValueError(
        f"architecture {architecture!r} is not a causal LM class of transformers {transformers.__version__}"
      )
    name = SAFE_CLASS_PREFIX + architecture
    doc = f"A {architecture} export as the safe model (see the module docstring)."
    _SAFE_CLASSES[architecture] = type(
      name, (ClsAlignMixin, base), {"__module__": __name__, "__qualname__": name, "__doc__": doc}
    )
  return _SAFE_CLASSES[architecture]


ClsAlignLlamaForCausalLM = safe_class("LlamaForCausalLM")
ClsAlignMistralForCausalLM = safe_class("MistralForCausalLM")
ClsAlignQwen2ForCausalLM = safe_class("Qwen2ForCausalLM")


def __getattr__(name: str):
  """`ClsAlign<Architecture>` for any other architecture: config.json's `auto_map` names the class
  of the export's family, which transformers looks up on this module."""
  if name.startswith(SAFE_CLASS_PREFIX) and name.endswith("ForCausalLM"):
    try:
      return safe_class(name[len(SAFE_CLASS_PREFIX) :])
    except ValueError:
      pass
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def export_architecture(config: dict, source: str = "config.json") -> str:
  """The transformers architecture an export's config.json names (`architectures`, as `convert`
  writes it from the family registry)."""
  archs = config.get("architectures") or []
  if len(archs) != 1 or not isinstance(archs[0], str):
    raise ValueError(f"{source}: architectures={archs!r}; expected one transformers class name")
  return archs[0]


class ClsAlignForCausalLM:
  """`ClsAlignForCausalLM.from_pretrained(path)`: the safe model of an export without remote code,
  as the safe class of the export's architecture."""

  @staticmethod
  def from_pretrained(pretrained_model_name_or_path, *args, **kwargs):
    hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
    path = _resolve(pretrained_model_name_or_path, "config.json", hub)
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    architecture = export_architecture(config, path)
    try:
      cls = safe_class(architecture)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
    return cls.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


__all__ = [
  "ClsAlignForCausalLM",
  "ClsAlignLlamaForCausalLM",
  "ClsAlignMistralForCausalLM",
  "ClsAlignQwen2ForCausalLM",
  "Settings",
  "StrategicOutput",
  "StrategicRow",
  "safe_class",
]
