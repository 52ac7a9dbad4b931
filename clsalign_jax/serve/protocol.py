"""The OpenAI wire format the server speaks: request models, their validation, error bodies.

Requests are parsed leniently where red-teaming clients are known to send fields this server has no
use for (`user`, `logprobs: false`, zero penalties, `stop: null`), and strictly where a value would
change the answer and the server cannot honour it (n > 1, non-zero penalties, tools, logit_bias):
those are refused with a 400 that names the field instead of being silently ignored.

Extensions (accepted by the official client through `extra_body`): `top_k` (0: off) and
`clsalign: {"trace": true}` for the per-step CLS trace in the response's `clsalign` object.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
  """An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

  def __init__(
    self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None, type: str = ""
  ):
    super().__init__(message)
    self.message = message
    self.status = status
    self.param = param
    self.code = code
    self.type = type or ("invalid_request_error" if status < 500 else "server_error")

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
  return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ContentPart(BaseModel):
  model_config = ConfigDict(extra="allow")
  type: str
  text: str | None = None


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="allow")
  role: Literal["system", "developer", "user", "assistant", "tool", "function"]
  content: str | list[ContentPart] | None = None
  name: str | None = None


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra="allow")
  include_usage: bool = False


class ClsOptions(BaseModel):
  """The `clsalign` request extension."""

  model_config = ConfigDict(extra="forbid")
  trace: bool = False


class _Sampling(BaseModel):
  """Fields common to both endpoints. None: the server's default (its command-line flags)."""

  model_config = ConfigDict(extra="ignore")
  model: str
  max_tokens: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  seed: int | None = None
  n: int | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  stop: str | list[str] | None = Field(default=None, validate_default=True)
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  logit_bias: dict[str, float] | None = None
  logprobs: Any = None
  user: str | None = None
  clsalign: ClsOptions = Field(default_factory=ClsOptions)

  @field_validator("stop")
  @classmethod
  def _stops(cls, v):
    if v is None:
      return []
    v = [v] if isinstance(v, str) else v
    if len(v) > 4:
      raise ValueError("at most 4 stop sequences")
    if any(not s for s in v):
      raise ValueError("a stop sequence is empty")
    return v


class ChatCompletionRequest(_Sampling):
  messages: list[ChatMessage]
  max_completion_tokens: int | None = None
  tools: list[Any] | None = None
  response_format: dict | None = None


class CompletionRequest(_Sampling):
  prompt: str | list[str]
  echo: bool = False
  suffix: str | None = None
  best_of: int | None = None


def message_text(message: ChatMessage, index: int) -> str:
  """A message's text; content parts other than text are refused (the model reads text only)."""
  if message.content is None:
    return ""
  if isinstance(message.content, str):
    return message.content
  texts = []
  for j, part in enumerate(message.content):
    if part.type != "text" or part.text is None:
      raise APIError(
        f"messages[{index}].content[{j}]: content parts of type {part.type!r} are not supported (text only)",
        param=f"messages[{index}].content",
        code="unsupported_content",
      )
    texts.append(part.text)
  return "".join(texts)


def chat_query(req: ChatCompletionRequest) -> tuple[str, str]:
  """(query, prefill) of a chat request.

  The run's chat template is single-turn (one user query, with the system prompt the run was
  trained with), so a conversation is one user message, optionally followed by one assistant
  message whose text becomes the start of the response (an attacker prefill) that the model
  continues. Anything else is refused rather than folded into a prompt the CLS never saw.
  """
  msgs = list(req.messages)
  if not msgs:
    raise APIError("messages is empty: send one user message", param="messages")
  for i, m in enumerate(msgs):
    if m.role in ("system", "developer"):
      raise APIError(
        f"messages[{i}]: {m.role} messages are not supported; the run's chat template carries the system "
        "prompt it was trained with",
        param=f"messages[{i}].role",
        code="unsupported_role",
      )
    if m.role in ("tool", "function"):
      raise APIError(f"messages[{i}]: {m.role} messages are not supported", param=f"messages[{i}].role")
  prefill = ""
  if msgs[-1].role == "assistant":
    prefill = message_text(msgs[-1], len(msgs) - 1)
    msgs = msgs[:-1]
  if len(msgs) != 1 or msgs[0].role != "user":
    raise APIError(
      "the run's chat template is single-turn: send exactly one user message, optionally followed by one "
      "assistant message (its text is the start of the response, which the model continues)",
      param="messages",
      code="unsupported_conversation",
    )
  query = message_text(msgs[0], 0)
  if not query.strip():
    raise APIError("messages[0].content is empty or whitespace-only", param="messages[0].content")
  return query, prefill


def completion_query(req: CompletionRequest) -> str:
  """The prompt of /v1/completions, which the server wraps as the user turn of the run's template."""
  prompt = req.prompt
  if isinstance(prompt, list):
    if len(prompt) != 1 or not isinstance(prompt[0], str):
      raise APIError(
        "prompt: give one string (batched prompts are not supported; send requests concurrently)", param="prompt"
      )
    prompt = prompt[0]
  if not prompt.strip():
    raise APIError("prompt is empty or whitespace-only", param="prompt")
  if req.echo:
    raise APIError("echo is not supported", param="echo")
  if req.suffix:
    raise APIError("suffix is not supported", param="suffix")
  if req.best_of not in (None, 1):
    raise APIError("best_of > 1 is not supported", param="best_of")
  return prompt


def check_unsupported(req: _Sampling) -> None:
  """Refuse options whose effect the server cannot honour (module docstring)."""
  if req.n not in (None, 1):
    raise APIError(f"n={req.n}: only n=1 is supported (send concurrent requests instead)", param="n")
  for name in ("presence_penalty", "frequency_penalty"):
    value = getattr(req, name)
    if value not in (None, 0, 0.0):
      raise APIError(f"{name}={value}: penalties are not supported (only 0)", param=name)
  if req.logit_bias:
    raise APIError("logit_bias is not supported", param="logit_bias")
  if req.logprobs not in (None, False, 0):
    raise APIError("logprobs are not supported", param="logprobs")
  if isinstance(req, ChatCompletionRequest):
    if req.tools:
      raise APIError("tools are not supported", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
      raise APIError("response_format: only text is supported", param="response_format")
