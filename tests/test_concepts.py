"""Concept learning by EM (zmagic_jax.concepts) on a tiny random Stable Diffusion: the spliced token
table, Break-A-Scene's losses against float64 by hand, what each phase trains, low-rank adapters,
the E-step's masks, checkpoint resume bit for bit and damaged checkpoints."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from zmagic_jax import concepts as C
from zmagic_jax.checkpoint_io import DamagedFileError, read_safetensors
from zmagic_jax.models import encode_prompt, load_stable_diffusion

pytestmark = pytest.mark.xdist_group("concepts")

# a few steps of each phase on the tiny model: enough to see what moves, cheap to compile
from tests.conftest import FAST_COMPILE

SETTINGS = C.ConceptSettings(iterations=2, steps_per_iteration=2, phase1_steps=2, phase2="lora", mask_timesteps=3,
                             crf=False, lr_phase2=1e-3)


@pytest.fixture(scope="module")
def sd(tiny_sd_dirs):
    return load_stable_diffusion(tiny_sd_dirs["path"])


@pytest.fixture(scope="module")
def image():
    """A 16 x 16 image (8 x 8 latents): a bright square top-left, a dark one bottom-right."""
    img = np.full((16, 16, 3), -0.2, np.float32)
    img[1:7, 1:7] = 0.9
    img[9:15, 9:15] = -0.9
    return img


MASKS = np.zeros((2, 16, 16), np.float32)
MASKS[0, 0:8, 0:8] = 1
MASKS[1, 8:16, 8:16] = 1


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _same(a, b) -> bool:
    fa, fb = _flat(a), _flat(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_placeholders_become_concept_ids_and_the_rest_is_the_tokenizers(sd):
    ids = C.tokenize_with_concepts(sd, ["lower <c1> newer <c0>", "lower newer"], ("<c0>", "<c1>"))
    plain = sd.tokenizer(["lower newer"], ids.shape[1])[0]
    vocab = sd.text_encoder.config.vocab_size
    np.testing.assert_array_equal(ids[1], plain)
    tok = sd.tokenizer
    expected = ([tok.bos_token_id] + tok.token_ids("lower") + [vocab + 1] + tok.token_ids("newer") + [vocab]
                + [tok.eos_token_id])
    assert list(ids[0, :len(expected)]) == expected and set(ids[0, len(expected):]) == {tok.pad_token_id}
    with pytest.raises(ValueError, match="names must be distinct"):
        C.tokenize_with_concepts(sd, ["x"], ("<c0>", "<c0>"))


def test_spliced_table_equals_the_extended_embedding_table(sd):
    """The extra rows act exactly as rows appended to the frozen table (same model, same ids)."""
    tokens = jax.random.normal(jax.random.key(0), (2, sd.text_encoder.config.hidden_size))
    ids = C.tokenize_with_concepts(sd, ["lower <c1> newer <c0>"], ("<c0>", "<c1>"))
    spliced = C.concept_context(sd, tokens, ["lower <c1> newer <c0>"], ("<c0>", "<c1>"))
    params = jax.tree.map(lambda x: x, sd.text_params)
    table = params["embeddings"]["token_embedding"]["embedding"]
    params["embeddings"]["token_embedding"]["embedding"] = jnp.concatenate([table, tokens])
    wide = dataclasses.replace(sd.text_encoder.config, vocab_size=table.shape[0] + 2)
    extended = type(sd.text_encoder)(wide).apply({"params": params}, jnp.asarray(ids)).last_hidden_state
    np.testing.assert_allclose(np.asarray(spliced), np.asarray(extended), rtol=1e-5, atol=1e-5)
    # prompts without placeholders are the model's own embeddings
    np.testing.assert_allclose(np.asarray(C.concept_context(sd, tokens, ["lower newer"], ("<c0>", "<c1>"))),
                               np.asarray(encode_prompt(sd, ["lower newer"])), rtol=1e-5, atol=1e-5)


def test_init_tokens_from_words_and_at_random(sd):
    table = np.asarray(sd.text_params["embeddings"]["token_embedding"]["embedding"])
    rows = np.asarray(C.init_tokens(sd, words=["lower", "newer"]))
    np.testing.assert_array_equal(rows, table[[sd.tokenizer.token_ids("lower")[0], sd.tokenizer.token_ids("newer")[0]]])
    a = C.init_tokens(sd, count=3, key=jax.random.key(1))
    assert a.shape == (3, table.shape[1]) and np.array_equal(a, C.init_tokens(sd, count=3, key=jax.random.key(1)))


def test_losses_equal_float64_by_hand(x64):
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(4, 6, 5)), rng.normal(size=(4, 6, 5))
    mask = (rng.random((6, 5)) > 0.5).astype(np.float64)
    expected = np.mean((mask * pred - mask * target) ** 2)
    np.testing.assert_allclose(C.masked_diffusion_loss(pred, target, mask), expected, rtol=1e-14)

    maps, masks = rng.random((3, 4, 4)), (rng.random((3, 4, 4)) > 0.5).astype(np.float64)
    maps[2] = 0.0  # a concept absent from the prompt
    selected = np.array([1.0, 1.0, 0.0])
    by_hand = sum(np.mean((maps[i] / maps[i].max() - masks[i]) ** 2) for i in (0, 1))
    np.testing.assert_allclose(C.attention_loss(maps, masks, selected), by_hand, rtol=1e-14)

    # token maps: probabilities (heads, r * r, L) of two layers, the concept ids at positions 2 and 4
    probs = [rng.random((3, 16, 6)), rng.random((3, 16, 6))]
    ids = np.array([7, 1, 50, 2, 51, 9])
    got = C.token_maps(probs, ids, np.array([51, 50, 52]), (4, 4))
    mean = (probs[0].mean(0) + probs[1].mean(0)) / 2
    np.testing.assert_allclose(got[0], mean[:, 4].reshape(4, 4), rtol=1e-14)
    np.testing.assert_allclose(got[1], mean[:, 2].reshape(4, 4), rtol=1e-14)
    assert np.all(np.asarray(got[2]) == 0)


def test_nearest_resize_is_pytorch_nearest():
    masks = np.arange(2 * 6 * 9, dtype=np.float32).reshape(2, 6, 9)
    got = np.asarray(C.resize_nearest(masks, (3, 4)))
    rows, cols = [0, 2, 4], [0, 2, 4, 6]  # floor(i * 6 / 3), floor(j * 9 / 4)
    np.testing.assert_array_equal(got, masks[:, rows][:, :, cols])


def test_lora_starts_at_the_unet_and_merges_low_rank(sd, x64):
    lora = C.lora_init(sd.unet_params, 2, jax.random.key(0))
    assert lora and all(name.split("/")[-1] in C.LORA_TARGETS for name in lora)
    assert _same(C.lora_merge(sd.unet_params, lora, 0.5), sd.unet_params)
    name = sorted(lora)[0]
    lora[name]["up"] = jnp.ones_like(lora[name]["up"])
    merged = traverse_util.flatten_dict(C.lora_merge(sd.unet_params, lora, 0.5), sep="/")
    kernel = np.asarray(traverse_util.flatten_dict(sd.unet_params, sep="/")[name + "/kernel"], np.float64)
    expected = kernel + 0.5 * np.asarray(lora[name]["down"], np.float64) @ np.ones(lora[name]["up"].shape)
    np.testing.assert_allclose(np.asarray(merged[name + "/kernel"]), expected, rtol=1e-6, atol=1e-7)


def test_masks_from_attention_threshold_and_exclusive():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, :2, :2], maps[0, :2, 2] = 4.0, 1.0   # a strong 2x2 block, a weak column (below half of the max)
    maps[1, 1:3, 1:3] = 2.0                      # overlaps concept 0 at (1, 1)
    image = np.zeros((4, 4, 3), np.float32)
    masks = np.asarray(C.masks_from_attention(jnp.asarray(maps), image, 0.5, crf=False, exclusive=False,))
    # bilinear upsampling of a 4 x 4 map to 4 x 4 is the identity
    np.testing.assert_array_equal(masks[0], maps[0] >= 4.0)
    np.testing.assert_array_equal(masks[1], maps[1] >= 2.0)
    exclusive = np.asarray(C.masks_from_attention(jnp.asarray(maps), image, 0.5, crf=False))
    assert exclusive[0, 1, 1] == 1 and exclusive[1, 1, 1] == 0 and exclusive[1, 2, 2] == 1


@pytest.fixture(scope="module")
def runs(sd, image, tmp_path_factory):
    """One uninterrupted run per phase-2 variant, and a run cut after its first iteration then
    resumed from its checkpoint (the same settings)."""
    out = {}
    for phase2 in ("lora", "full"):
        settings = dataclasses.replace(SETTINGS, phase2=phase2)
        out[phase2] = C.learn_concepts(sd, image, jax.random.key(3), masks=MASKS, settings=settings, compiler_options=FAST_COMPILE)
    path = tmp_path_factory.mktemp("ckpt") / "em.safetensors"

    def stop(iteration, masks, losses):
        if iteration == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        C.learn_concepts(sd, image, jax.random.key(3), masks=MASKS, settings=SETTINGS, checkpoint=path, progress=stop, compiler_options=FAST_COMPILE)
    out["cut"] = tmp_path_factory.mktemp("ckpt") / "cut.safetensors"
    out["cut"].write_bytes(path.read_bytes())
    out["resumed"] = C.learn_concepts(sd, image, jax.random.key(3), masks=MASKS, settings=SETTINGS, checkpoint=path, compiler_options=FAST_COMPILE)
    out["checkpoint"] = path
    return out


def test_phase1_trains_only_the_tokens_and_phase2_the_chosen_params(sd, image, runs):
    # the checkpoint of the end of phase 1 (iteration 1 of the cut run) holds the tokens as the one
    # trainable entry, moved away from their initial values
    tensors, _ = read_safetensors(runs["cut"])
    assert {name.split("']")[1] for name in tensors if name.startswith("['trainable']")} == {"['tokens"}
    start = C.init_tokens(sd, count=2, key=jax.random.fold_in(jax.random.key(3), 0))
    assert not np.array_equal(tensors["['trainable']['tokens']"], start)
    full = runs["full"]
    assert set(full.trained) == {"unet", "text"}
    assert not _same(full.trained["text"], sd.text_params) and not _same(full.trained["unet"], sd.unet_params)
    lora = runs["lora"]
    assert set(lora.trained) == {"lora"}
    assert any(np.any(np.asarray(a["up"]) != 0) for a in lora.trained["lora"].values())
    assert not _same(lora.model(sd).unet_params, sd.unet_params)
    assert _same(lora.model(sd).text_params, sd.text_params)
    # phase 1 is the same in every variant: the same steps, the same tokens' losses
    np.testing.assert_array_equal(full.losses[:2], lora.losses[:2])
    assert np.all(np.isfinite(lora.losses)) and lora.masks.shape == (3, 2, 8, 8)


def test_resumed_run_equals_the_uninterrupted_run_bit_for_bit(runs):
    a, b = runs["lora"], runs["resumed"]
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert _same(a.trained, b.trained)


def test_damaged_or_foreign_checkpoints_are_clear_errors(sd, image, runs, tmp_path):
    good = runs["checkpoint"].read_bytes()
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF
    path = tmp_path / "em.safetensors"
    path.write_bytes(bytes(flipped))
    with pytest.raises(DamagedFileError, match="SHA-256"):
        C.learn_concepts(sd, image, jax.random.key(3), masks=MASKS, settings=SETTINGS, checkpoint=path, compiler_options=FAST_COMPILE)
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(DamagedFileError, match="not a valid .safetensors"):
        C.learn_concepts(sd, image, jax.random.key(3), masks=MASKS, settings=SETTINGS, checkpoint=path, compiler_options=FAST_COMPILE)
    path.write_bytes(good)
    with pytest.raises(ValueError, match="another run"):
        C.learn_concepts(sd, image, jax.random.key(4), masks=MASKS, settings=SETTINGS, checkpoint=path, compiler_options=FAST_COMPILE)


def test_one_program_serves_every_rate_and_weight(sd, image, runs):
    """The learning rates live in the optimiser state and the loss weights are leaves."""
    program = C._programs(tuple(sorted(FAST_COMPILE.items())))[0]
    before = program._cache_size()
    for rate, weight in ((5e-4, 0.01), (1e-3, 0.5)):
        settings = dataclasses.replace(SETTINGS, lr_tokens=rate, lambda_attention=weight)
        C.learn_concepts(sd, image, jax.random.key(5), masks=MASKS, settings=settings, compiler_options=FAST_COMPILE)
    assert program._cache_size() == before


def test_bad_arguments_name_the_fix(sd, image):
    with pytest.raises(ValueError, match="image must be one"):
        C.learn_concepts(sd, image * 3, jax.random.key(0), masks=MASKS, settings=SETTINGS, compiler_options=FAST_COMPILE)
    with pytest.raises(ValueError, match="number of concepts once"):
        C.learn_concepts(sd, image, jax.random.key(0), count=3, masks=MASKS, settings=SETTINGS, compiler_options=FAST_COMPILE)
    with pytest.raises(ValueError, match="phase2 must be"):
        C.ConceptSettings(phase2="all")
    with pytest.raises(ValueError, match="box"):
        C.box_masks([[0, 0, 20, 4]], (16, 16))


def test_the_e_step_crf_removes_an_isolated_pixel():
    """Attention on a block plus one stray pixel of the block's strength: the threshold keeps both,
    the CRF (CutLER's constants) keeps the block only."""
    maps = np.zeros((1, 12, 12), np.float32)
    maps[0, 2:8, 2:8] = 1.0
    maps[0, 10, 10] = 1.0
    image = np.zeros((12, 12, 3), np.float32)
    image[2:8, 2:8] = 255.0
    raw = np.asarray(C.masks_from_attention(jnp.asarray(maps), image, 0.5, crf=False))
    refined = np.asarray(C.masks_from_attention(jnp.asarray(maps), image, 0.5, crf=True))
    assert raw[0, 10, 10] == 1 and refined[0, 10, 10] == 0
    np.testing.assert_array_equal(refined[0], maps[0] * (np.arange(12)[:, None] < 9))


def test_prior_preservation_adds_the_class_images_unmasked_loss(sd, image):
    """With prior weight 0 the loss is the instance loss alone (the class image rides in the same
    batch without changing it); its prior part is a plain MSE, positive."""
    from zmagic_jax.models import encode_image

    model = C.concept_model(sd, (8, 8))
    names = ("<c0>", "<c1>")
    prompts, selections, sizes = C.union_prompts(names)
    latents = jnp.stack([encode_image(sd, image), encode_image(sd, image[:, ::-1])])
    data = C.ConceptData(latents, C.resize_nearest(MASKS, (8, 8)), jnp.asarray(C.tokenize_with_concepts(sd, prompts, names)),
                         jnp.asarray(selections), jnp.asarray([0, 2]), jnp.asarray([2, 2]),
                         jnp.asarray(C.concept_token_ids(sd, 2)), jnp.asarray(sd.schedule.alphas_cumprod, jnp.float32))
    with_prior = data._replace(prior_latents=latents[:1] * 0.5,
                               prior_ids=jnp.asarray(C.tokenize_with_concepts(sd, ["lower"], names)[0]))
    trainable = {"tokens": C.init_tokens(sd, count=2, key=jax.random.key(0))}
    frozen = {"unet": sd.unet_params, "text": sd.text_params}
    key = jax.random.key(7)
    loss = jax.jit(lambda *a: C.concept_loss(*a, model=model), compiler_options=FAST_COMPILE)
    alone, parts = loss(trainable, frozen, data, C.Hyper(), key)
    zero, zparts = loss(trainable, frozen, with_prior, C.Hyper(prior_weight=0.0), key)
    one, oparts = loss(trainable, frozen, with_prior, C.Hyper(prior_weight=1.0), key)
    assert float(parts[2]) == 0.0 and float(zparts[2]) > 0
    np.testing.assert_allclose(float(zero), float(alone), rtol=1e-5)
    np.testing.assert_allclose(float(one), float(zero) + float(oparts[2]), rtol=1e-6)


def test_unmasked_inversion_moves_random_tokens_before_the_first_e_step(sd, image):
    """Without masks the first masks come from the E-step; inversion_steps train the tokens on the
    whole image first, so the first masks and tokens differ from a run without it."""
    base = dataclasses.replace(SETTINGS, iterations=1, mask_prompts="each")
    plain = C.learn_concepts(sd, image, jax.random.key(9), count=2, settings=base, compiler_options=FAST_COMPILE)
    inverted = C.learn_concepts(sd, image, jax.random.key(9), count=2, compiler_options=FAST_COMPILE,
                                settings=dataclasses.replace(base, inversion_steps=3))
    assert plain.masks.shape == inverted.masks.shape == (2, 2, 8, 8)
    assert set(np.unique(inverted.masks)) <= {0.0, 1.0} and np.all(np.isfinite(inverted.losses))
    assert not np.array_equal(plain.tokens, inverted.tokens)
