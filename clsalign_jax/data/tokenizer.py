"""Tokenizers for the data room: one `Tokenizer` over a HF `tokenizers.Tokenizer`.

Every source (a HF `tokenizer.json`, a SentencePiece `.model`, a GGUF file) is turned into a
`tokenizers.Tokenizer`, so offsets, batching and `save_hf` share one code path. SentencePiece models are
converted here (BPE merges derived from piece scores) and checked against `sentencepiece` itself on
load; GGUF vocabularies are rebuilt from the file's metadata the way `transformers` does it.

The [CLS] token is not part of the base tokenizer: `cls_id == vocab_size`, the one extra row of the
model's input embedding. The LM head never produces it.

A model may have more embedding rows than its tokenizer has tokens (Qwen2.5 pads 151,665 tokens to
151,936 rows for the hardware). `Tokenizer.for_model` / `with_vocab_size` then make `vocab_size` the
model's rows, so that [CLS] sits one past them; the ids in between ("padded ids") have no token:
encode never produces them, and decode gives no text for them, as the HF tokenizer does (it drops
ids it has no token for), so a decoded sample equals transformers' decode of the same ids.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import pathlib
import re
import struct
from collections.abc import Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from clsalign_jax.assets import mistral_sentencepiece_path, smollm2_gguf_path  # noqa: F401  (re-exported)

CLS_TOKEN = "[CLS]"
# `save_hf` writes a padded tokenizer's padded ids as special tokens of this form, so that [CLS]
# keeps its id in the HF files; reading such a file back drops them again.
_PADDED_TOKEN = "<|clsalign_padded_{}|>"
_PADDED_RE = re.compile(r"<\|clsalign_padded_(\d+)\|>")

# SentencePiece / GGUF piece types (the two formats share the enum).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_SP_SPACE = "\u2581"

# Probes for load-time self checks: whitespace runs, byte fallback, CJK, markup-like text.
_PROBES = (
  "Hello world",
  "  two leading spaces",
  "trailing  ",
  "a\tb\r\nc\n\n d",
  "emoji \U0001f600 and CJK \u65e5\u672c\u8a9e \u4e2d\u6587",
  "[INST] <<SYS>> <s> </s> <|im_start|> [/INST]",
  "digits 1234567890 and 3.14",
  "caf\u00e9 na\u00efve \u00a0nbsp",
)


class Tokenizer:
  """Text <-> ids for one base vocabulary, plus the [CLS] id one past its end.

  `encode` adds no special tokens. For SentencePiece-style vocabularies it does add the dummy-prefix
  space ("▁") at the start of the text, as `sentencepiece` and HF do; `encode_continuation` encodes
  text that directly follows other text, without that prefix. `decode` is the inverse of `encode`,
  `decode_fragment` the inverse of `encode_continuation` (it keeps a leading space).
  """

  def __init__(
    self,
    hf_tokenizer: tokenizers.Tokenizer,
    *,
    bos_token: str,
    eos_token: str,
    pad_token: str | None = None,
    unk_token: str | None = None,
    chat_template: str | None = None,
    add_bos_by_default: bool = False,
    name: str = "",
    bos_declared: bool = True,
  ):
    self.name = name
    # False when the BOS was guessed from the vocabulary (the files name none, e.g. Qwen2.5):
    # `for_model` then takes the model config's BOS instead.
    self.bos_declared = bos_declared
    self.chat_template = chat_template
    # Only a post-processor in the saved HF files uses this; our own encode never adds BOS.
    self.add_bos_by_default = add_bos_by_default
    spec, padded_size = _without_trailing_cls(json.loads(hf_tokenizer.to_str()))
    self._spec = spec
    self._tok = _load_spec(spec)
    # Ids below base_vocab_size are this tokenizer's tokens; from there to vocab_size, padded ids.
    self.base_vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.vocab_size = max(self.base_vocab_size, padded_size)
    self.cls_id = self.vocab_size
    self._fitted: dict[tuple[int, int], Tokenizer] = {}
    self.bos_id = self._require_id(bos_token, "bos_token")
    self.eos_id = self._require_id(eos_token, "eos_token")
    self.unk_id = self._tok.token_to_id(unk_token) if unk_token else None
    # Padding positions carry segment id 0 and are masked everywhere; the id only has to be a
    # valid embedding row, so fall back to <unk> or EOS when the vocabulary has no pad token.
    if pad_token is not None:
      self.pad_id = self._require_id(pad_token, "pad_token")
    elif self.unk_id is not None:
      self.pad_id = self.unk_id
    else:
      self.pad_id = self.eos_id
    self._special_ids = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")} | {self.bos_id, self.eos_id}
    continuation_spec = _without_prefix_space(spec)
    self.adds_prefix_space = continuation_spec is not None
    self._cont = _load_spec(continuation_spec) if continuation_spec else self._tok
    self._anchor_ids, self._anchor_text = self._find_anchor()
    self._check_concatenation()

  # ----- constructors -------------------------------------------------------------------------

  @classmethod
  def from_tokenizer_json(
    cls,
    path: str | os.PathLike,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    chat_template: str | None = None,
  ) -> Tokenizer:
    """Loads a HF `tokenizer.json`; special tokens default to a sibling `tokenizer_config.json`."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    hf = tokenizers.Tokenizer.from_file(str(path))
    config = _read_sibling_config(path.parent)
    bos_token = bos_token or config.get("bos_token")
    bos_declared = bos_token is not None
    eos_token = eos_token or config.get("eos_token")
    pad_token = pad_token or config.get("pad_token")
    unk_token = unk_token or config.get("unk_token")
    chat_template = chat_template or config.get("chat_template")
    vocab = hf.get_vocab(with_added_tokens=True)
    bos_token = bos_token or _first_present(vocab, ("<s>", "<|begin_of_text|>", "<bos>", "<|im_start|>"))
    eos_token = eos_token or _first_present(vocab, ("</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|endoftext|>"))
    if bos_token is None or eos_token is None:
      raise ValueError(
        f"{path}: cannot tell the BOS/EOS tokens; pass bos_token= and eos_token= "
        "or put a tokenizer_config.json next to the file"
      )
    add_bos = _post_processor_adds(json.loads(hf.to_str()).get("post_processor"), bos_token)
    tok = cls(
      hf,
      bos_token=bos_token,
      eos_token=eos_token,
      pad_token=pad_token if pad_token in vocab else None,
      unk_token=unk_token if unk_token in vocab else None,
      chat_template=chat_template,
      add_bos_by_default=add_bos,
      name=str(path),
      bos_declared=bos_declared,
    )
    # A tokenizer stored with its model (an HF directory) fits that model wherever it is loaded.
    model = _read_model_config(path.parent)
    if model is not None:
      tok = tok.for_model(*model)
    return tok

  @classmethod
  def from_sentencepiece(cls, path: str | os.PathLike) -> Tokenizer:
    """Converts a SentencePiece `.model` (BPE or unigram) and checks it against `sentencepiece`."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
      proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or trainer.treat_whitespace_as_suffix:
      # Each rewrites the text (NFKC, collapsed or moved whitespace), so encoded pieces would
      # not decode back to the input and token spans could not be exact. Llama-2 and Mistral
      # use the identity normalizer.
      raise NotImplementedError(
        f"{path}: only SentencePiece models with the identity normalizer, kept whitespace "
        "and prefix whitespace are supported (spans could not be exact otherwise)"
      )
    model_type = {1: "unigram", 2: "bpe"}.get(trainer.model_type)
    if model_type is None:
      raise NotImplementedError(f"{path}: SentencePiece model type {trainer.model_type}")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    hf = _spm_tokenizer(
      pieces,
      model_type=model_type,
      unk_id=trainer.unk_id,
      byte_fallback=trainer.byte_fallback,
      add_dummy_prefix=norm.add_dummy_prefix,
    )

    def piece(i: int) -> str | None:
      return pieces[i][0] if 0 <= i < len(pieces) else None

    tok = cls(
      hf,
      bos_token=piece(trainer.bos_id),
      eos_token=piece(trainer.eos_id),
      pad_token=piece(trainer.pad_id),
      unk_token=piece(trainer.unk_id),
      add_bos_by_default=trainer.bos_id >= 0,
      name=str(path),
    )
    _check_against_sentencepiece(tok, str(path))
    return tok

  @classmethod
  def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
    """Rebuilds the tokenizer stored in a GGUF file's metadata (as `transformers` reads it)."""
    from gguf import Keys

    meta = read_gguf_metadata(path)
    keys = Keys.Tokenizer
    model, tokens = meta.get(keys.MODEL), meta.get(keys.LIST)
    if model is None or tokens is None:
      raise ValueError(f"{path}: no tokenizer metadata in this GGUF file")
    types = meta.get(keys.TOKEN_TYPE) or [_NORMAL] * len(tokens)
    bos_id, eos_id = meta.get(keys.BOS_ID), meta.get(keys.EOS_ID)
    unk_id, pad_id = meta.get(keys.UNK_ID), meta.get(keys.PAD_ID)
    if model == "gpt2":
      pre = meta.get(keys.PRE)
      if pre not in GGUF_PRE_TOKENIZERS:
        raise NotImplementedError(
          f"{path}: tokenizer.ggml.pre={pre!r} is not supported (supported: "
          f"{', '.join(sorted(GGUF_PRE_TOKENIZERS))}); its split rules decide which merges apply, "
          "so a guessed pre-tokenizer would give wrong ids"
        )
      hf = _byte_level_tokenizer(
        tokens,
        types,
        meta[keys.MERGES],
        add_prefix_space=bool(meta.get(keys.ADD_PREFIX, False)),
        pre=pre,
      )
      add_bos = bool(meta.get(keys.ADD_BOS, False))
    elif model == "llama":
      hf = _spm_tokenizer(
        list(zip(tokens, meta[keys.SCORES], types)),
        model_type="bpe",
        unk_id=-1 if unk_id is None else unk_id,
        byte_fallback=_BYTE in types,
        add_dummy_prefix=bool(meta.get(keys.ADD_PREFIX, True)),
      )
      add_bos = bool(meta.get(keys.ADD_BOS, True))
    else:
      raise NotImplementedError(f"{path}: GGUF tokenizer model {model!r}")

    def token(i):
      return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return cls(
      hf,
      bos_token=token(bos_id),
      eos_token=token(eos_id),
      pad_token=token(pad_id),
      unk_token=token(unk_id),
      chat_template=meta.get(keys.CHAT_TEMPLATE),
      add_bos_by_default=add_bos,
      name=str(path),
    )

  # ----- fitting to a model --------------------------------------------------------------------

  def with_vocab_size(self, vocab_size: int) -> Tokenizer:
    """This tokenizer for a model with `vocab_size` embedding rows (at least its own tokens): [CLS]
    moves to `vocab_size`, the ids from `base_vocab_size` up to it become padded ids."""
    vocab_size = int(vocab_size)
    if vocab_size < self.base_vocab_size:
      raise ValueError(
        f"{self.name}: has {self.base_vocab_size} tokens, more than the model's {vocab_size} embedding rows"
      )
    if vocab_size == self.vocab_size:
      return self
    out = copy.copy(self)
    out.vocab_size = out.cls_id = vocab_size
    out._fitted = {}
    return out

  def with_bos_id(self, bos_id: int) -> Tokenizer:
    """This tokenizer with BOS `bos_id` (one of its own tokens), as declared."""
    bos_id = int(bos_id)
    if self._tok.id_to_token(bos_id) is None:
      raise ValueError(f"{self.name}: BOS id {bos_id} is not a token of this vocabulary")
    if bos_id == self.bos_id and self.bos_declared:
      return self
    out = copy.copy(self)
    out.bos_id, out.bos_declared = bos_id, True
    out._special_ids = {t["id"] for t in self._spec.get("added_tokens", []) if t.get("special")} | {bos_id, self.eos_id}
    out._fitted = {}
    return out

  def for_model(self, vocab_size: int, bos_id: int | None = None) -> Tokenizer:
    """This tokenizer fitted to a model with `vocab_size` embedding rows and BOS `bos_id`.

    Only what the tokenizer leaves open changes: rows past its tokens become padded ids (a
    tokenizer with more tokens than the model has rows is returned as it is; callers refuse it),
    and the model's BOS replaces a guessed one (the files named none). The result is cached, so
    every caller fitting the same tokenizer to the same model gets the same object.
    """
    key = (int(vocab_size), -1 if bos_id is None else int(bos_id))
    if key not in self._fitted:
      out = self.with_vocab_size(vocab_size) if vocab_size > self.vocab_size else self
      if bos_id is not None and not self.bos_declared and self._tok.id_to_token(int(bos_id)) is not None:
        out = out.with_bos_id(bos_id)
      self._fitted[key] = out
    return self._fitted[key]

  def is_padded(self, i: int) -> bool:
    """Whether `i` is a padded id: an embedding row past this tokenizer's tokens, not [CLS]."""
    return self.base_vocab_size <= int(i) < self.vocab_size

  # ----- encoding -----------------------------------------------------------------------------

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and (start, end) character offsets into `text`, one pair per id."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return enc.ids, [tuple(o) for o in enc.offsets]

  def encode_continuation(self, text: str) -> list[int]:
    """Ids of `text` when it directly follows other text at a token boundary."""
    return self._cont.encode(text, add_special_tokens=False).ids

  def encode_markup(self, template: str, **slots: str) -> list[int]:
    """Ids of a prompt template whose literal special tokens (e.g. "<|eot_id|>") become their ids.

    The template is split at this vocabulary's special-token strings *before* the `{slot}` values
    (str.format syntax) are filled in, so slot text is always encoded as text: a response that
    contains "<|eot_id|>" cannot close the judge's turn. Text after a special token is encoded as
    a continuation (no SentencePiece dummy prefix), as HF tokenizers do.
    """
    specials = self.special_tokens()
    if not specials:
      pieces = [template]
    else:
      pattern = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
      pieces = [p for p in re.split(f"({pattern})", template) if p]
    ids: list[int] = []
    for piece in pieces:
      if piece in specials:
        ids.append(specials[piece])
        continue
      text = piece.format(**slots)
      ids.extend(self.encode_continuation(text) if ids else self.encode(text))
    return ids

  def special_tokens(self) -> dict[str, int]:
    """The base vocabulary's special tokens (text -> id); [CLS] is not among them."""
    return {t["content"]: t["id"] for t in self._spec.get("added_tokens", []) if t.get("special")}

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text, on all cores (Rust threads, the GIL released)."""
    # encode_batch_fast (tokenizers >= 0.20) gives the same ids without computing offsets: ~20%
    # less CPU, which is most of a streamed pretraining input's cost.
    fast = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
    return [e.ids for e in fast(list(texts), add_special_tokens=False)]

  # ----- decoding -----------------------------------------------------------------------------

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Inverse of `encode`; [CLS] decodes to "[CLS]" unless special tokens are skipped, padded ids
    to nothing (module docstring)."""
    parts, run = [], []
    for i in (int(x) for x in ids):
      if self.is_padded(i):
        continue
      if i == self.cls_id:
        if run:
          parts.append(self._tok.decode(run, skip_special_tokens=skip_special_tokens))
          run = []
        if not skip_special_tokens:
          parts.append(CLS_TOKEN)
      else:
        run.append(i)
    if run:
      parts.append(self._tok.decode(run, skip_special_tokens=skip_special_tokens))
    return "".join(parts)

  def decode_fragment(self, ids: Sequence[int]) -> str:
    """Exact text of ids cut from the middle of a sequence (keeps a leading space)."""
    # SentencePiece-style decoders strip one leading space, which is right for a whole text
    # but wrong for a span inside one; a fixed anchor token in front keeps that space.
    ids = [int(i) for i in ids]
    if self.cls_id in ids:
      raise ValueError("decode_fragment got the [CLS] id; it has no text")
    ids = [i for i in ids if not self.is_padded(i)]
    text = self._tok.decode(self._anchor_ids + ids, skip_special_tokens=False)
    if not text.startswith(self._anchor_text):
      raise AssertionError(f"anchor {self._anchor_text!r} lost while decoding {ids[:8]}")
    return text[len(self._anchor_text) :]

  # ----- vocabulary ---------------------------------------------------------------------------

  def token_to_id(self, token: str) -> int | None:
    if token == CLS_TOKEN:
      return self.cls_id
    return self._tok.token_to_id(token)

  def id_to_token(self, i: int) -> str | None:
    if i == self.cls_id:
      return CLS_TOKEN
    return self._tok.id_to_token(int(i))

  def is_special(self, i: int) -> bool:
    """[CLS], a special token of the vocabulary, BOS / EOS, or a padded id (never to be picked)."""
    return i == self.cls_id or i in self._special_ids or self.is_padded(i)

  @property
  def bos_token(self) -> str:
    return self._tok.id_to_token(self.bos_id)

  @property
  def eos_token(self) -> str:
    return self._tok.id_to_token(self.eos_id)

  def __repr__(self) -> str:
    return (
      f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, base_vocab_size={self.base_vocab_size}, "
      f"cls_id={self.cls_id}, "
      f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
    )

  # ----- export -------------------------------------------------------------------------------

  def save_hf(self, directory: str | os.PathLike) -> None:
    """Writes HF tokenizer files with [CLS] as special token id `vocab_size` (loads offline)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = _load_spec(self._spec)
    hf.encode_special_tokens = False  # HF users expect "<s>" in text to parse as the token
    if self.add_bos_by_default and self._spec.get("post_processor") is None:
      # So that AutoTokenizer(...)(text) adds BOS like the original SentencePiece tokenizer.
      hf.post_processor = processors.TemplateProcessing(
        single=f"{self.bos_token} $A",
        pair=f"{self.bos_token} $A {self.bos_token} $B",
        special_tokens=[(self.bos_token, self.bos_id)],
      )
    padded = [_PADDED_TOKEN.format(i) for i in range(self.base_vocab_size, self.vocab_size)]
    hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in (*padded, CLS_TOKEN)])
    if hf.token_to_id(CLS_TOKEN) != self.cls_id:
      raise AssertionError(f"[CLS] got id {hf.token_to_id(CLS_TOKEN)}, expected {self.cls_id}")
    hf.save(str(directory / "tokenizer.json"))
    specials = {
      "bos_token": self.bos_token,
      "eos_token": self.eos_token,
      "pad_token": self._tok.id_to_token(self.pad_id),
      "cls_token": CLS_TOKEN,
    }
    if self.unk_id is not None:
      specials["unk_token"] = self._tok.id_to_token(self.unk_id)
    config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      **specials,
      "clean_up_tokenization_spaces": False,
      "model_max_length": 1 << 30,
    }
    if self.chat_template:
      config["chat_template"] = self.chat_template
    with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)
    with open(directory / "special_tokens_map.json", "w", encoding="utf-8") as f:
      json.dump(specials, f, indent=2, ensure_ascii=False)

  # ----- internals ----------------------------------------------------------------------------

  def _require_id(self, token: str | None, what: str) -> int:
    i = self._tok.token_to_id(token) if token is not None else None
    if i is None:
      raise ValueError(f"{self.name}: {what} {token!r} is not in the vocabulary")
    return i

  def _find_anchor(self) -> tuple[list[int], str]:
    for text in ("a", "x", "."):
      ids = self._cont.encode(text, add_special_tokens=False).ids
      if len(ids) == 1 and self._tok.decode(ids) == text:
        return ids, text
    raise ValueError(f"{self.name}: no single-token ASCII anchor for fragment decoding")

  def _check_concatenation(self) -> None:
    # Spans are computed by concatenating independently encoded pieces; that is only sound if
    # the continuation encoder adds no prefix and the fragment decoder drops no space. (Texts a
    # normalizer changes, e.g. NFKC, are caught per example by the template code.)
    for head, tail in (("a", " b"), ("a", "b")):
      ids = self.encode(head) + self.encode_continuation(tail)
      if self.decode(ids) != head + tail or self.decode_fragment(self.encode_continuation(tail)) != tail:
        raise NotImplementedError(
          f"{self.name}: cannot encode text continuations losslessly with this tokenizer's normalizer/pre-tokenizer"
        )


# ----- GGUF metadata ----------------------------------------------------------------------------


def read_gguf_metadata(path: str | os.PathLike) -> dict:
  """Key/value metadata of a GGUF (v2/v3) file, without touching its tensors.

  `gguf.GGUFReader` builds a numpy view per array element, which takes seconds for a 49k-token
  vocabulary; the metadata section is a flat little-endian stream and parses in milliseconds.
  """
  from gguf import GGUF_MAGIC, GGUFValueType

  scalar = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
  }
  with open(path, "rb") as f:
    head = f.read(24)
    magic, version, _, n_kv = struct.unpack("<IIQQ", head)
    if magic != GGUF_MAGIC:
      raise ValueError(f"{path}: not a GGUF file")
    if version not in (2, 3):
      raise NotImplementedError(f"{path}: GGUF version {version}")
    # Metadata sits at the front; 64 MiB covers vocabularies far beyond 256k tokens.
    buf = memoryview(f.read(64 << 20))
  pos = 0

  def take(fmt: str):
    nonlocal pos
    (v,) = struct.unpack_from(fmt, buf, pos)
    pos += struct.calcsize(fmt)
    return v

  def string() -> str:
    nonlocal pos
    n = take("<Q")
    out = bytes(buf[pos : pos + n]).decode("utf-8", errors="surrogateescape")
    pos += n
    return out

  def value(kind: int):
    nonlocal pos
    kind = GGUFValueType(kind)
    if kind == GGUFValueType.STRING:
      return string()
    if kind == GGUFValueType.ARRAY:
      elem, n = take("<I"), take("<Q")
      if elem in scalar:
        fmt = scalar[GGUFValueType(elem)]
        size = struct.calcsize(fmt)
        arr = list(struct.unpack_from(f"<{n}{fmt[1]}", buf, pos))
        pos += size * n
        return arr
      return [value(elem) for _ in range(n)]
    return take(scalar[kind])

  meta = {}
  for _ in range(n_kv):
    key = string()
    meta[key] = value(take("<I"))
  return meta


# ----- helpers: tokenizer.json manipulation -------------------------------------------------------


def _load_spec(spec: dict) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
  # User text must never turn into control tokens ("<|im_end|>" typed by a user stays text);
  # templates insert special ids directly.
  tok.encode_special_tokens = True
  return tok


def _without_trailing_cls(spec: dict) -> tuple[dict, int]:
  """Drops a [CLS] token sitting one past the base vocabulary (a `save_hf` output read back), and
  the padded ids' placeholder tokens before it; returns the spec and the padded vocabulary size
  (0: not padded)."""
  added = spec.get("added_tokens", [])
  cls_ids = [t["id"] for t in added if t["content"] == CLS_TOKEN]
  if not cls_ids:
    return spec, 0
  last_id = _load_spec(spec).get_vocab_size(with_added_tokens=True) - 1
  if cls_ids != [last_id]:
    raise ValueError(f"[CLS] is already in this vocabulary at id {cls_ids}, not at its end")
  # Placeholders count only as the run of ids right below [CLS], each naming its own id.
  padded = {t["id"] for t in added if (m := _PADDED_RE.fullmatch(t["content"])) and int(m.group(1)) == t["id"]}
  first = last_id
  while first - 1 in padded:
    first -= 1
  spec = copy.deepcopy(spec)
  spec["added_tokens"] = [t for t in added if t["id"] < first]
  return spec, last_id if first < last_id else 0


def _without_prefix_space(spec: dict) -> dict | None:
  """A spec that does not add the dummy prefix space, or None if the original adds none."""
  changed = False

  def fix_normalizer(n):
    nonlocal changed
    if n is None:
      return None
    if n["type"] == "Prepend":
      changed = True
      return None
    if n["type"] == "Sequence":
      kept = [fix_normalizer(x) for x in n["normalizers"]]
      return {**n, "normalizers": [x for x in kept if x is not None]}
    return n

  def fix_pre_tokenizer(p):
    nonlocal changed
    if p is None:
      return None
    if p["type"] == "Metaspace":
      if p.get("prepend_scheme", "always") != "never" or p.get("add_prefix_space"):
        changed = True
      fixed = {k: v for k, v in p.items() if k != "add_prefix_space"}
      return {**fixed, "prepend_scheme": "never"}
    if p["type"] == "ByteLevel" and p.get("add_prefix_space"):
      changed = True
      return {**p, "add_prefix_space": False}
    if p["type"] == "Sequence":
      return {**p, "pretokenizers": [fix_pre_tokenizer(x) for x in p["pretokenizers"]]}
    return p

  # Shallow copy: the vocabulary and merges are shared, only the two small stages are rebuilt.
  out = dict(spec)
  out["normalizer"] = fix_normalizer(spec.get("normalizer"))
  out["pre_tokenizer"] = fix_pre_tokenizer(spec.get("pre_tokenizer"))
  return out if changed else None


def _post_processor_adds(post: dict | None, token: str) -> bool:
  if post is None:
    return False
  return token in json.dumps(post.get("single", post.get("processors", "")))


def _read_sibling_config(directory: pathlib.Path) -> dict:
  out = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    p = directory / name
    if p.is_file():
      with open(p, encoding="utf-8") as f:
        for k, v in json.load(f).items():
          out[k] = v["content"] if isinstance(v, dict) and "content" in v else v
  return out


def _read_model_config(directory: pathlib.Path) -> tuple[int, int | None] | None:
  """(vocab_size, bos_token_id) of an HF model's config.json in `directory`; None without one (a
  training run's config.json is not one: it names no `architectures`)."""
  p = directory / "config.json"
  if not p.is_file():
    return None
  try:
    with open(p, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError):
    return None  # the model loader names a broken config.json
  if not isinstance(config, dict) or "architectures" not in config or not isinstance(config.get("vocab_size"), int):
    return None
  bos = config.get("bos_token_id")
  bos = bos[0] if isinstance(bos, list) and bos else bos
  return config["vocab_size"], bos if isinstance(bos, int) else None


def _first_present(vocab: dict, names: Sequence[str]) -> str | None:
  return next((n for n in names if n in vocab), None)


# ----- helpers: building tokenizers from piece lists ----------------------------------------------


def _spm_tokenizer(
  pieces: Sequence[tuple[str, float, int]],
  *,
  model_type: str,
  unk_id: int,
  byte_fallback: bool,
  add_dummy_prefix: bool,
) -> tokenizers.Tokenizer:
  unk_piece = pieces[unk_id][0] if unk_id >= 0 else None
  if model_type == "bpe":
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    # SentencePiece BPE merges the adjacent pair whose merged piece scores highest; an HF merge
    # list ranked by that score (ties: lower piece id first) reproduces it. Only normal pieces
    # take part: byte, control and user-defined pieces are never merge products.
    mergeable = {p for p, _, t in pieces if t == _NORMAL}
    ranked = []
    for i, (p, score, t) in enumerate(pieces):
      if t != _NORMAL:
        continue
      for k in range(1, len(p)):
        left, right = p[:k], p[k:]
        if left in mergeable and right in mergeable:
          ranked.append((-score, i, vocab[left], vocab[right], left, right))
    ranked.sort()
    model = models.BPE(
      vocab=vocab,
      merges=[(r[4], r[5]) for r in ranked],
      unk_token=unk_piece,
      byte_fallback=byte_fallback,
      fuse_unk=True,
    )
  else:
    # sentencepiece never segments text into control, unknown, unused or byte pieces, but HF's
    # Viterbi would (a literal "<s>" scores 0.0); a prohibitive score keeps them out.
    model = models.Unigram(
      [(p, s if t in (_NORMAL, _USER_DEFINED) else -1e9) for p, s, t in pieces],
      unk_id=unk_id if unk_id >= 0 else None,
      byte_fallback=byte_fallback,
    )
  tok = tokenizers.Tokenizer(model)
  steps = []
  if add_dummy_prefix:
    steps.append(normalizers.Prepend(_SP_SPACE))
  steps.append(normalizers.Replace(" ", _SP_SPACE))
  tok.normalizer = normalizers.Sequence(steps)
  dec = [decoders.Replace(_SP_SPACE, " ")]
  if byte_fallback:
    dec.append(decoders.ByteFallback())
  dec.append(decoders.Fuse())
  if add_dummy_prefix:
    dec.append(decoders.Strip(" ", 1, 0))
  tok.decoder = decoders.Sequence(dec)
  special = [p for p, _, t in pieces if t in (_CONTROL, _UNKNOWN)]
  user = [p for p, _, t in pieces if t == _USER_DEFINED]
  tok.add_special_tokens([tokenizers.AddedToken(p, special=True, normalized=False) for p in special])
  if user:
    # As in HF's own conversion: the text between user symbols then gets its own dummy prefix
    # (sentencepiece adds one per input), so ids differ right after such a symbol. Llama-2 and
    # Mistral define none.
    tok.add_tokens([tokenizers.AddedToken(p, special=False, normalized=False) for p in user])
  return tok


# GPT-2's split pattern (what ByteLevel(use_regex=True) applies).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
# Llama-3's: case-insensitive contractions, a letter run with one leading non-letter, digit groups
# of at most three, punctuation runs with their trailing newlines, newline runs, spaces.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` values (llama.cpp's names) -> split patterns applied in order before the
# byte-level mapping. SmolLM splits every digit on its own first, then applies GPT-2's pattern.
GGUF_PRE_TOKENIZERS = {
  "gpt-2": (_GPT2_SPLIT,),
  "smollm": (r"\p{N}", _GPT2_SPLIT),
  "llama-bpe": (_LLAMA3_SPLIT,),
  "llama3": (_LLAMA3_SPLIT,),
}


def _byte_level_tokenizer(
  tokens: Sequence[str],
  types: Sequence[int],
  merges: Sequence[str],
  *,
  add_prefix_space: bool,
  pre: str = "gpt-2",
) -> tokenizers.Tokenizer:
  vocab = {t: i for i, t in enumerate(tokens)}
  # Byte-level tokens never contain a literal space (it is mapped to "Ġ"), so one split is exact.
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False))
  splits = [
    pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated", invert=False)
    for pattern in GGUF_PRE_TOKENIZERS[pre]
  ]
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [*splits, pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)]
  )
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(
    [tokenizers.AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
  )
  user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
  if user:
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in user])
  return tok


def _check_against_sentencepiece(tok: Tokenizer, path: str) -> None:
  import sentencepiece

  sp = sentencepiece.SentencePieceProcessor(model_file=path)
  for text in _PROBES:
    want, got = sp.encode(text), tok.encode(text)
    if want != got:
      raise AssertionError(
        f"{path}: converted tokenizer disagrees with sentencepiece on {text!r}: {got[:16]} vs {want[:16]}"
      )


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str) -> Tokenizer:
  """'smollm2', 'mistral', or a path to a .gguf, a SentencePiece .model or a tokenizer.json
  (or a directory holding one)."""
  if spec == "smollm2":
    return Tokenizer.from_gguf(smollm2_gguf_path())
  if spec == "mistral":
    return Tokenizer.from_sentencepiece(mistral_sentencepiece_path())
  if spec.endswith(".gguf"):
    return Tokenizer.from_gguf(spec)
  if spec.endswith(".model"):
    return Tokenizer.from_sentencepiece(spec)
  if os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "tokenizer.json")):
    return Tokenizer.from_sentencepiece(os.path.join(spec, "tokenizer.model"))
  return Tokenizer.from_tokenizer_json(spec)
