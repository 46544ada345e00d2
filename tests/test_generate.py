"""Recurrent decoding: prefill + step equals the full forward; `generate` against argmax and transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mamba_jax
from mamba_jax import MambaConfig, MambaLM
from mamba_jax.generate import _filter_logits
from tests.conftest import make_hf_mamba, rel_err

ARCH_CONFIGS = {
  "mamba1": MambaConfig.tiny("mamba1"),
  "mamba2": MambaConfig.tiny("mamba2"),
  "mamba2_groups_hdim_limit": MambaConfig.tiny(
    "mamba2", ngroups=2, D_has_hdim=True, dt_limit=(0.01, 0.5), norm_before_gate=True
  ),
  "mamba2_dssm": MambaConfig.tiny("mamba2", d_ssm=32),
}


@pytest.mark.parametrize("name", ARCH_CONFIGS)
def test_prefill_then_steps_equal_full_forward(name):
  model = MambaLM(ARCH_CONFIGS[name], rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 19), 0, 100)
  full = model(ids)
  logits, cache = model.prefill(ids[:, :3])  # shorter than the conv width: left-padded conv state
  steps = [logits]
  for t in range(3, 19):
    step_logits, cache = model.step(ids[:, t], cache)
    steps.append(step_logits[:, None])
  assert rel_err(jnp.concatenate(steps, axis=1), full) < 1e-5


@pytest.mark.parametrize("arch", [pytest.param("mamba1", marks=pytest.mark.slow), "mamba2"])  # decode: prefill test
def test_greedy_generate_equals_argmax_of_full_forward(arch):
  model = MambaLM(MambaConfig.tiny(arch, vocab_size=97), rngs=nnx.Rngs(3))
  prompt = jax.random.randint(jax.random.PRNGKey(0), (2, 5), 0, 97)
  out = np.asarray(mamba_jax.generate(model, prompt, max_new_tokens=6))
  assert out.shape == (2, 11)
  np.testing.assert_array_equal(out[:, :5], prompt)
  seq = np.asarray(prompt)
  for _ in range(6):
    logits = np.asarray(model(jnp.asarray(seq)))[:, -1, :97]  # padded rows 97..103 are never produced
    seq = np.concatenate([seq, logits.argmax(-1)[:, None]], axis=1)
  np.testing.assert_array_equal(out, seq)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_greedy_generate_equals_transformers(torch_mods, tmp_path, arch):
  torch, _ = torch_mods
  ref = make_hf_mamba(torch_mods, tmp_path, arch)
  model = mamba_jax.from_pretrained(tmp_path)
  prompt = np.random.default_rng(0).integers(0, 96, (2, 6))
  with torch.no_grad():
    expected = ref.generate(torch.as_tensor(prompt), max_new_tokens=10, do_sample=False, min_new_tokens=10).numpy()
  np.testing.assert_array_equal(np.asarray(mamba_jax.generate(model, prompt, max_new_tokens=10)), expected)


def test_sampling_filters():
  logits = jnp.array([[0.0, 3.0, 1.0, 2.0, 5.0, -1.0]])
  neg = jnp.finfo(jnp.float32).min
  kept = lambda f: np.asarray(f > neg / 2)[0]
  np.testing.assert_array_equal(kept(_filter_logits(logits, 6, 2, None)), [0, 1, 0, 0, 1, 0])
  np.testing.assert_array_equal(kept(_filter_logits(logits, 4, None, None)), [1, 1, 1, 1, 0, 0])
  # softmax of [5, 3, 2, ...]: p(5) ~ 0.83, so top_p 0.5 keeps one token and 0.9 keeps two.
  np.testing.assert_array_equal(kept(_filter_logits(logits, 6, None, 0.5)), [0, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(kept(_filter_logits(logits, 6, None, 0.9)), [0, 1, 0, 0, 1, 0])


def test_sampling_is_seeded_and_top_k_1_is_greedy():
  model = MambaLM(MambaConfig.tiny("mamba2"), rngs=nnx.Rngs(0))
  prompt = jnp.array([[1, 2, 3]])
  a = mamba_jax.generate(model, prompt, 6, temperature=1.0, seed=1)
  b = mamba_jax.generate(model, prompt, 6, temperature=1.0, seed=1)
  np.testing.assert_array_equal(a, b)
  greedy = mamba_jax.generate(model, prompt, 6)
  np.testing.assert_array_equal(mamba_jax.generate(model, prompt, 6, temperature=0.7, top_k=1, seed=5), greedy)
  assert mamba_jax.generate(model, jnp.array([1, 2]), 3).shape == (5,)
  with pytest.raises(ValueError, match="non-empty"):
    mamba_jax.generate(model, jnp.zeros((1, 0), jnp.int32), 3)
