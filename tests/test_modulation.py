"""SOW's attention modulation (zmagic_jax.modulation) against the formula computed by hand in
float64: the added scores, each switch, the decays, the indicator, and the modulated probabilities
of a tiny UNet's self-attention layer."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from experiments.tiny_models import random_tree
from zmagic_jax.contracts import Denoiser
from zmagic_jax.models._attention import attention
from zmagic_jax.models._sd_convert import unet_param_shapes
from zmagic_jax.models._unet2d import UNet2DConditionConfig, UNet2DConditionModel, attention_layers
from zmagic_jax.modulation import (Modulation, RegionModulation, at_cycle, box_mask, region_modulation,
                                   region_modulations, strip_modulation)

# an 8 x 8 canvas; the condition a 4 x 4 block at rows 0..3, columns 2..5; related: the lower half
CONDITION = box_mask((0, 2, 4, 6), (8, 8))
RELATED = box_mask((4, 0, 8, 8), (8, 8))
# at a 4 x 4 layer (cells of 2 x 2): condition rows 0..1, columns 1..2; related rows 2..3
COND4 = np.zeros((4, 4))
COND4[0:2, 1:3] = 1
REL4 = np.zeros((4, 4))
REL4[2:4] = 1


def _by_hand(scores, settings: Modulation, cycle=0.0):
    """The module docstring's formula in float64 for the 4 x 4 layer of the masks above."""
    s = np.asarray(scores, np.float64)
    centre = (2.0 / 8, 4.0 / 8)  # condition pixels: mean row 1.5, mean column 3.5, +0.5 -> / 8
    pos_r, pos_c = np.meshgrid((np.arange(4) + 0.5) / 4, (np.arange(4) + 0.5) / 4, indexing="ij")
    dist = np.sqrt((pos_r - centre[0]) ** 2 + (pos_c - centre[1]) ** 2).ravel()
    s_rel, s_cond = 1 - settings.size_reg * 8 / 16, 1 - settings.size_reg * 4 / 16
    spatial = np.exp(-dist / settings.spatial_scale) if settings.spatial_decay else 1.0
    enhance = settings.enhance_strength * s_rel * spatial * REL4.ravel() * settings.enhance
    suppress = settings.suppress_strength * s_cond * COND4.ravel() * settings.suppress
    keys = COND4.ravel()
    top = s.max(-1, keepdims=True) - s
    bottom = s - s.min(-1, keepdims=True)
    added = enhance[:, None] * keys[None] * top - suppress[:, None] * (1 - keys[None]) * bottom
    added *= (settings.decay ** cycle) if settings.temporal_decay else 1.0
    if settings.indicator:
        # related queries: rows 2..3 (8 cells); the closest fifth = 2 cells: (2, 1) and (2, 2)
        probs = np.exp(s - s.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        probe = [2 * 4 + 1, 2 * 4 + 2]
        mass = probs[:, :, probe][..., keys > 0].sum(-1).mean((1, 2))
        added *= (mass < settings.threshold)[:, None, None, None]
    return added


def _scores(seed=0, scale=1.0):
    return scale * np.random.default_rng(seed).normal(size=(2, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("change", [{}, {"suppress": False}, {"enhance": False}, {"temporal_decay": False},
                                    {"spatial_decay": False}, {"indicator": False}, {"size_reg": 0.0},
                                    {"enhance_strength": 2.0, "decay": 0.5}])
def test_added_scores_by_hand(change):
    settings = dataclasses.replace(Modulation(threshold=0.3), **change)
    mod = region_modulation(CONDITION, RELATED, (4, 4), settings, cycle=2.0)
    scores = _scores()
    np.testing.assert_allclose(mod(jnp.asarray(scores)), _by_hand(scores, settings, cycle=2.0), rtol=1e-5,
                               atol=1e-6)


def test_the_indicator_gates_a_sample_by_its_probed_mass():
    settings = Modulation(threshold=0.5)
    scores = _scores()
    # sample 0: the probed queries already attend to the condition keys -> gated off
    scores[0, :, 9:11][..., COND4.ravel() > 0] += 10.0
    added = np.asarray(region_modulation(CONDITION, RELATED, (4, 4), settings)(jnp.asarray(scores)))
    assert np.all(added[0] == 0.0) and np.abs(added[1]).max() > 0.1
    np.testing.assert_allclose(added, _by_hand(scores, settings), rtol=1e-5, atol=1e-6)


def test_probes_are_the_closest_fifth_of_the_related_region():
    mod = region_modulation(CONDITION, RELATED, (4, 4), Modulation())
    probe = np.asarray(mod.probe_rows)
    assert np.flatnonzero(probe).tolist() == [9, 10] and probe.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(np.asarray(mod.condition_keys), COND4.ravel())


def test_zero_strength_adds_exactly_zero_and_leaves_attention_bit_identical():
    mod = region_modulation(CONDITION, RELATED, (4, 4), Modulation(suppress_strength=0.0, enhance_strength=0.0,
                                                                   indicator=False))
    added = np.asarray(mod(jnp.asarray(_scores())))
    assert np.all(added == 0.0)
    q, k, v = (jnp.asarray(np.random.default_rng(i).normal(size=(2, 16, 3, 8)), jnp.float32) for i in range(3))
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, modifier=mod)), np.asarray(attention(q, k, v)))


def test_a_callable_modifier_is_added_to_the_scores():
    q, k, v = (jnp.asarray(np.random.default_rng(i).normal(size=(2, 16, 3, 8)), jnp.float32) for i in range(3))
    fixed = jnp.asarray(_scores(5))
    seen = []

    def modifier(scores):
        seen.append(scores)
        return fixed

    out, probs = attention(q, k, v, modifier=modifier, return_probs=True)
    expected = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64)) / np.sqrt(8)
    np.testing.assert_allclose(seen[0], expected, rtol=1e-5, atol=1e-5)
    ref_out, ref_probs = attention(q, k, v, modifier=fixed, return_probs=True)
    np.testing.assert_array_equal(np.asarray(probs), np.asarray(ref_probs))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))


def test_settings_and_masks_errors():
    with pytest.raises(ValueError, match="decay must be a finite number in"):
        Modulation(decay=1.5)
    with pytest.raises(ValueError, match="spatial_scale must be a finite number"):
        Modulation(spatial_scale=0.0)
    with pytest.raises(ValueError, match="indicator must be True or False"):
        Modulation(indicator=1)
    with pytest.raises(ValueError, match="layers must be 'all' or a tuple"):
        Modulation(layers=16)
    with pytest.raises(ValueError, match="related is empty"):
        region_modulation(CONDITION, 0 * RELATED, (4, 4), Modulation())
    with pytest.raises(ValueError, match="must divide the canvas"):
        region_modulation(CONDITION, RELATED, (3, 3), Modulation())
    with pytest.raises(ValueError, match="box .* must lie inside"):
        box_mask((0, 0, 9, 4), (8, 8))
    mod = region_modulation(CONDITION, RELATED, (4, 4), Modulation())
    with pytest.raises(ValueError, match="for 16 queries x 16 keys"):
        mod(jnp.zeros((1, 1, 64, 64)))


# --- on a tiny UNet ----------------------------------------------------------------------------------

TINY = UNet2DConditionConfig(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                             num_attention_heads=2, cross_attention_dim=8, norm_num_groups=8)


@pytest.fixture(scope="module")
def tiny():
    module = UNet2DConditionModel(TINY)
    params = random_tree(unet_param_shapes(TINY), 3)
    rng = np.random.default_rng(4)
    sample = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    return module, params, sample, context, attention_layers(TINY, 8)


def test_modulated_probabilities_follow_the_formula_on_a_tiny_unet(tiny):
    """One self-attention layer modulated (8 x 8 layer of an 8 x 8 latent): its recorded
    probabilities equal softmax(S + added(S)) with S recovered from the unmodulated run's
    probabilities (log P0 = S - logsumexp; the formula's S_max - S and S - S_min do not see the
    row constant)."""
    module, params, sample, context, layers = tiny
    layer = [l for l in layers if l.kind == "self" and l.place == "down"][0]
    condition, related = box_mask((0, 0, 4, 4), (8, 8)), box_mask((4, 0, 8, 8), (8, 8))
    settings = Modulation(suppress_strength=1.0, enhance_strength=1.0, indicator=False)
    mods = {layer.name: region_modulation(condition, related, layer.resolution, settings)}
    run = jax.jit(lambda p, m: module.apply({"params": p}, sample, jnp.array([10, 900]), context, record=(layer.name,),
                                            modifiers=m, mutable=["attention"]))
    plain_out, plain = run(params, None)
    out, modulated = run(params, mods)
    p0, p1 = (np.asarray(next(iter(traverse_util.flatten_dict(dict(state["attention"])).values()))[0], np.float64)
              for state in (plain, modulated))
    s = np.log(p0)
    cond = condition.ravel()
    rel = related.ravel()
    pos = (np.arange(8) + 0.5) / 8
    dist = np.hypot(*(g.ravel() for g in np.meshgrid(pos - 2.0 / 8, pos - 2.0 / 8, indexing="ij")))
    enhance = 1.0 * (1 - 32 / 64) * np.exp(-dist / 0.5) * rel
    suppress = 1.0 * (1 - 16 / 64) * cond
    added = (enhance[:, None] * cond[None] * (s.max(-1, keepdims=True) - s)
             - suppress[:, None] * (1 - cond[None]) * (s - s.min(-1, keepdims=True)))
    expected = np.exp(s + added - (s + added).max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(p1, expected, atol=2e-5)
    # suppression lowered the condition queries' mass on the other keys; enhancement raised the related rows'
    inside, outside = cond > 0, cond == 0
    assert np.all(p1[:, :, inside][..., outside].sum(-1) < p0[:, :, inside][..., outside].sum(-1))
    assert np.all(p1[:, :, rel > 0][..., inside].sum(-1) > p0[:, :, rel > 0][..., inside].sum(-1))
    assert np.abs(np.asarray(out) - np.asarray(plain_out)).max() > 1e-3


def test_zero_strength_is_the_unmodulated_unet_bit_for_bit(tiny):
    """Op by op (eager) the modulated UNet with both strengths 0 is the plain one, bit for bit;
    under jit to float32 round-off (XLA fuses the attention with and without the added scores
    differently, as for any zero modifier)."""
    module, params, sample, context, layers = tiny
    mods = region_modulations(layers, box_mask((0, 0, 4, 4), (8, 8)), box_mask((4, 0, 8, 8), (8, 8)),
                              Modulation(suppress_strength=0.0, enhance_strength=0.0))
    t = jnp.array([10, 900])
    plain = module.apply({"params": params}, sample, t, context)
    zero = module.apply({"params": params}, sample, t, context, modifiers=mods)
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain))


def test_region_modulations_pick_self_attention_layers_and_cycles_decay(tiny):
    _, _, _, _, layers = tiny
    mods = region_modulations(layers, CONDITION, RELATED, Modulation())
    assert set(mods) == {l.name for l in layers if l.kind == "self"}
    high = {l.name for l in layers if l.kind == "self" and l.resolution == (8, 8)}
    assert len(high) == 3 and set(region_modulations(layers, CONDITION, RELATED, Modulation(layers=(8,)))) == high
    with pytest.raises(ValueError, match="no self-attention layer matches layers=\\(2,\\)"):
        region_modulations(layers, CONDITION, RELATED, Modulation(layers=(2,)))
    den = Denoiser(lambda p, x, t: x, {"unet": 1.0, "modifiers": mods})
    later = at_cycle(den, 3)
    for name, mod in later.params["modifiers"].items():
        assert float(mod.cycle) == 3.0 and isinstance(mod, RegionModulation)
    assert "modifiers" not in strip_modulation(den).params and strip_modulation(den).params["unet"] == 1.0
    # tau = decay ** cycle: cycle 3 adds 0.8 ** 3 of cycle 0's scores (indicator off for a clean ratio)
    one = region_modulation(CONDITION, RELATED, (4, 4), Modulation(indicator=False))
    s = jnp.asarray(_scores(2))
    np.testing.assert_allclose(one.replace(cycle=jnp.float32(3))(s), 0.8 ** 3 * np.asarray(one(s)), rtol=1e-5,
                               atol=1e-7)
