"""The model-family registry (families.py): its entries against transformers' own classes, its
lookups, and that the model, interop and loader read it instead of testing family names."""

import ast
import pathlib

import pytest
import transformers

from clsalign_jax import families
from clsalign_jax import model as M
from clsalign_jax.data.templates import get_template

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clsalign_jax"
# The modules that used to switch on family names; they now consult the registry.
CONSUMERS = ("model.py", "interop/hf.py", "interop/gguf.py", "artifacts.py")


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_entry_agrees_with_transformers(name):
  family = families.get(name)
  assert family.name == name
  for arch in family.hf_architectures:
    model_cls = getattr(transformers, arch)
    assert model_cls.config_class.model_type == name, arch
  config = model_cls.config_class()
  # The defaults an import falls back on are transformers' own for this config class ...
  assert family.hf_defaults["rms_norm_eps"] == config.rms_norm_eps
  assert family.hf_defaults["tie_word_embeddings"] == config.tie_word_embeddings
  assert family.hf_defaults["rope_theta"] == config.rope_parameters["rope_theta"]
  if name == "qwen2":
    assert family.hf_defaults["max_position_embeddings"] == config.max_position_embeddings
  # ... the bias trait is what the torch module builds ...
  tiny = model_cls.config_class(
    vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
  )
  attn = model_cls(tiny).model.layers[0].self_attn
  assert [getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj")] == [
    family.qkv_bias
  ] * 3 + [False]
  # ... and every key an export adds is one the config class knows.
  for key in family.hf_export_extra:
    assert hasattr(config, key), (name, key)


def test_lookups():
  assert families.family_for_hf_architecture("Qwen2ForCausalLM").name == "qwen2"
  assert families.family_for_hf_architecture("MistralForCausalLM").name == "mistral"
  assert families.family_for_hf_architecture("LlamaForCausalLM").name == "llama"
  assert families.family_for_hf_architecture("GPT2LMHeadModel") is None
  assert families.family_for_gguf("llama").name == "llama"
  assert families.family_for_gguf("qwen2").name == "qwen2"
  assert families.family_for_gguf("gemma") is None
  assert families.hf_architectures() == ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]
  with pytest.raises(KeyError, match="unknown model family 'gpt2'; known: llama, mistral, qwen2"):
    families.get("gpt2")


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_entry_names_what_exists(name):
  family = families.get(name)
  assert set(family.rope_types) <= set(M.ROPE_TYPES)
  assert get_template(family.chat_template).name == family.chat_template
  # A GGUF architecture is also the prefix of its metadata keys: one family per name.
  for arch in family.gguf_architectures:
    assert families.family_for_gguf(arch) is family


def test_model_config_reads_the_registry():
  fields = dict(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8)
  assert M.ModelConfig(**fields, family="qwen2").qkv_bias
  assert not M.ModelConfig(**fields).qkv_bias
  with pytest.raises(ValueError, match="family='gpt2'; known: llama, mistral, qwen2"):
    M.ModelConfig(**fields, family="gpt2")
  with pytest.raises(ValueError, match="rope_type='llama3' is not one of the qwen2 family's"):
    M.ModelConfig(**fields, family="qwen2", rope_type="llama3", rope_factor=8.0)
  with pytest.raises(ValueError, match="hf_window"):
    families.Family(name="x", hf_architectures=("XForCausalLM",), hf_window="sometimes")


def test_registry_is_a_leaf_module():
  # Everything may import the registry, so it may import nothing of the package.
  tree = ast.parse((PACKAGE / "families.py").read_text())
  imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
  assert imported and not [m for m in imported if m.startswith("clsalign_jax")]


@pytest.mark.parametrize("module", CONSUMERS)
def test_consumers_do_not_switch_on_family_names(module):
  # A family's behaviour is a field of its entry: no `cfg.family == "mistral"`, no architecture
  # name spelled outside the registry.
  tree = ast.parse((PACKAGE / module).read_text())
  arch_names = {a for f in families.FAMILIES.values() for a in f.hf_architectures}
  offences = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      sides = [node.left, *node.comparators]
      names_family = any(getattr(s, "attr", getattr(s, "id", None)) == "family" for s in sides)
      literal = lambda s: isinstance(s, (ast.Tuple, ast.Set, ast.List)) or isinstance(getattr(s, "value", None), str)
      if names_family and any(literal(s) for s in sides):
        offences.append(f"line {node.lineno}: compares a family to a literal")
    if isinstance(node, ast.Constant) and node.value in arch_names:
      offences.append(f"line {node.lineno}: {node.value!r}")
  assert not offences, f"{module}: {offences}"
