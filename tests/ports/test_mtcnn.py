"""MTCNN ONet port: parity with PyTorch on facenet-pytorch's real weights and on random weights,
the area-resampling crop against ``F.interpolate(mode='area')``, and the converter's errors.

The random weights are numpy draws in the reference's layout (``tests/parity.py``); the PyTorch
values are computed live where PyTorch is installed and read from
``tests/references/ports_mtcnn.safetensors`` elsewhere (``tests/references.py``); the small
checkpoint is a file ``torch.save`` wrote (``experiments/make_parity_fixtures.py``)."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.make_parity_fixtures import PORT_FILE_CONFIGS
from tests.parity import CHECKPOINTS, file_state_dict, reference_state_dict, sketch
from tests.references import torch_reference
from zmagic_jax.models._mtcnn import ONet, ONetConfig, onet_landmarks, onet_preprocess
from zmagic_jax.ports._checkpoint import CheckpointMismatchError, save_params
from zmagic_jax.ports._mtcnn import convert_onet, installed_onet_path, load_onet

GROUP = "ports_mtcnn"
HEADS = ("prob", "box", "landmarks")
# The published ONet, and the small one of the committed checkpoint.
CONFIGS = {"published": ONetConfig(), "small": PORT_FILE_CONFIGS["onet"]}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def smooth_images(seed, batch, size):
    """Smooth random RGB images in [-1, 1]: bilinear upsampling (half-pixel centres) of 6x6 noise."""
    low = np.random.default_rng(seed).uniform(-1, 1, (batch, 6, 6, 3))
    position = np.clip((np.arange(size) + 0.5) * 6 / size - 0.5, 0, 5)
    weights = np.maximum(0.0, 1.0 - np.abs(position[:, None] - np.arange(6)))  # linear interpolation
    return np.einsum("ih,bhwc,jw->bijc", weights, low, weights).astype(np.float32)


def synthetic_face(size=96):
    """A cartoon frontal face in [-1, 1]: skin ellipse, eyes at (0.36|0.64, 0.42), nose, mouth at y=0.72."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3)) + [0.2, 0.3, 0.35]
    img[((xx - .5) / .32) ** 2 + ((yy - .52) / .42) ** 2 < 1] = [0.85, 0.65, 0.5]
    for cx in (.36, .64):
        img[((xx - cx) / .07) ** 2 + ((yy - .42) / .035) ** 2 < 1] = [0.1, 0.08, 0.08]
        img[(abs(xx - cx) < .09) & (abs(yy - .33) < .012)] = [0.2, 0.12, 0.1]
    img[(abs(xx - .5) < .03 + (yy - .45) * .2) & (yy > .45) & (yy < .6)] = [0.75, 0.52, 0.4]
    img[((xx - .5) / .14) ** 2 + ((yy - .72) / .03) ** 2 < 1] = [0.6, 0.2, 0.2]
    return (img * 2 - 1).astype(np.float32)


def torch_preprocess(x0, box):
    """facenet-pytorch's third-stage input: crop, interpolate(mode='area') to 48, (p - 127.5) / 128."""
    import torch
    top, left, height, width = box
    pixels = (torch.as_tensor(x0).permute(0, 3, 1, 2) + 1) * 127.5
    crop = pixels[:, :, top:top + height, left:left + width]
    return (torch.nn.functional.interpolate(crop, size=(48, 48), mode="area") - 127.5) * 0.0078125


def _torch_onet(state_dict=None, config=ONetConfig()):
    """The PyTorch reference at ``config``, with ``state_dict`` loaded when given."""
    from ports.random_weights import load_weights_
    from ports.torch_mtcnn import from_config
    model = from_config(config)
    return model if state_dict is None else load_weights_(model, state_dict)


def _real_torch_onet(path):
    import torch
    model = _torch_onet()
    model.load_state_dict(torch.load(path))
    return model.eval()


def torch_outputs(net, x_nchw):
    import torch
    with torch.no_grad():
        return {k: v.numpy() for k, v in net(x_nchw).items()}


def random_weights(name):
    """Random ONet weights at ``CONFIGS[name]`` (the small ones are the committed checkpoint's)."""
    if name == "small":
        return file_state_dict(GROUP, "onet")
    return reference_state_dict(GROUP, name, _torch_onet, seed=48)


@pytest.fixture(scope="module")
def onet_pt():
    if importlib.util.find_spec("facenet_pytorch") is None:
        pytest.skip("facenet-pytorch is not installed (pip install --no-deps facenet-pytorch==2.6.0): "
                    "its data/onet.pt holds the real ONet weights")
    return installed_onet_path()


@pytest.fixture(scope="module")
def real(onet_pt):
    module, params = load_onet()
    return jax.jit(module.apply), {"params": params}, onet_pt


@pytest.fixture(scope="module")
def real_inputs():
    """Faces and smooth images at several sizes, two per batch (one compiled ONet), with the box ONet sees."""
    face = synthetic_face(96)
    shifted = np.pad(synthetic_face(80), ((20, 12), (6, 26), (0, 0)), constant_values=-0.3)
    return [
        (np.stack([face, face[:, ::-1]]), (0, 0, 96, 96)),
        (np.stack([shifted, smooth_images(0, 1, 112)[0]]), (20, 6, 80, 80)),
        (smooth_images(1, 2, 64), (5, 3, 57, 50)),
        (smooth_images(2, 2, 40), (0, 0, 40, 40)),
    ]


def test_real_weights_parity(real, real_inputs):
    apply, variables, onet_pt = real
    for i, (x0, box) in enumerate(real_inputs):
        def torch_values():
            x_torch = torch_preprocess(x0, box)
            return {"input": sketch(x_torch.permute(0, 2, 3, 1).numpy()),
                    **torch_outputs(_real_torch_onet(onet_pt), x_torch)}

        ref = torch_reference(GROUP, f"real/{i}", torch_values)
        x_jax = onet_preprocess(jnp.asarray(x0), box)
        assert x_jax.shape == (2, 48, 48, 3)
        np.testing.assert_allclose(sketch(x_jax), ref["input"], atol=2e-6)
        ours = apply(variables, x_jax)
        for head in HEADS:
            assert rel_err(ours[head], ref[head]) < 1e-4, (head, box, rel_err(ours[head], ref[head]))


def test_real_weights_gradient_matches_torch(real):
    """d(landmarks + face logit terms)/dx0 through crop, area resampling and ONet, against autograd."""
    apply, variables, onet_pt = real
    x0, box = smooth_images(3, 2, 60), (4, 2, 53, 55)
    probe = np.random.default_rng(0).normal(size=(2, 10)).astype(np.float32)

    def energy(x):
        out = apply(variables, onet_preprocess(x, box))
        return jnp.sum(out["landmarks"] * probe) + jnp.sum(jnp.log(out["prob"][:, 1]))

    def torch_gradient():
        import torch
        x_t = torch.from_numpy(x0).requires_grad_(True)
        out = _real_torch_onet(onet_pt)(torch_preprocess(x_t, box))
        (out["landmarks"] * torch.from_numpy(probe)).sum().add(out["prob"][:, 1].log().sum()).backward()
        return sketch(x_t.grad.numpy())

    grad = jax.jit(jax.grad(energy))(jnp.asarray(x0))
    assert rel_err(sketch(grad), torch_reference(GROUP, "real/gradient", torch_gradient)) < 1e-4
    assert np.all(np.asarray(grad)[:, :box[0]] == 0)  # pixels outside the box get no gradient


def test_real_weights_sanity_on_synthetic_face(real):
    apply, variables, _ = real
    face, box = synthetic_face(96), (0, 0, 96, 96)
    out = apply(variables, onet_preprocess(jnp.asarray(np.stack([face, smooth_images(4, 1, 96)[0]])), box))
    prob = np.asarray(out["prob"])
    assert np.all(prob >= 0) and np.allclose(prob.sum(-1), 1, atol=1e-6)
    assert prob[0, 1] > 0.25 and prob[0, 1] > 10 * prob[1, 1]  # the cartoon face (0.53) reads as a face, noise not
    points = np.asarray(onet_landmarks(out, box))[0]
    assert np.all((points >= 0) & (points <= 96))
    # Drawn at: eyes (34.6, 40.3) and (61.4, 40.3), nose tip around (48, 52), mouth corners (34.6|61.4, 69.1).
    drawn = np.array([[34.6, 40.3], [61.4, 40.3], [48.0, 52.0], [34.6, 69.1], [61.4, 69.1]])
    assert np.abs(points - drawn).max() < 8, points


def test_landmarks_map_into_the_box():
    outputs = {"landmarks": jnp.array([[0.0, 1.0, 0.5, 0.25, 0.75, 0.0, 0.0, 0.5, 1.0, 1.0]])}
    points = onet_landmarks(outputs, (10, 20, 40, 60))
    np.testing.assert_allclose(points[0], [[20, 10], [80, 10], [50, 30], [35, 50], [65, 50]])
    np.testing.assert_allclose(onet_landmarks(outputs["landmarks"], (10, 20, 40, 60)), points)


@pytest.mark.parametrize("hw, box", [((70, 90), (3, 11, 61, 75)), ((30, 30), (0, 0, 30, 30)),
                                     ((50, 50), (7, 1, 33, 48)), ((48, 48), (0, 0, 48, 48))])
def test_preprocess_matches_area_interpolation(hw, box):
    x0 = np.random.default_rng(hw[0]).uniform(-1, 1, size=(2, *hw, 3)).astype(np.float32)
    ours = onet_preprocess(jnp.asarray(x0), box)
    assert ours.shape == (2, 48, 48, 3)
    ref = torch_reference(GROUP, f"preprocess/{hw}/{box}",
                          lambda: sketch(torch_preprocess(x0, box).permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(sketch(ours), ref, atol=2e-6)


def test_preprocess_rejects_box_outside_image():
    with pytest.raises(ValueError, match="inside the 40x40 image"):
        onet_preprocess(jnp.zeros((1, 40, 40, 3)), (10, 10, 31, 20))


@pytest.mark.parametrize("name", CONFIGS)
def test_random_weights_parity(tmp_path, name):
    """Random weights, converted and through save_params -> .safetensors -> load_onet, against PyTorch."""
    config, state_dict = CONFIGS[name], random_weights(name)
    params = convert_onet(state_dict, config)
    save_params(tmp_path / "onet.safetensors", params)
    module, reloaded = load_onet(tmp_path / "onet.safetensors", config)
    x = smooth_images(5, 3, config.input_size)

    def torch_values():
        import torch
        return torch_outputs(_torch_onet(state_dict, config), torch.from_numpy(x).permute(0, 3, 1, 2))

    ref = torch_reference(GROUP, f"random/{name}", torch_values)
    apply = jax.jit(module.apply)
    for p in (params, reloaded):
        ours = apply({"params": p}, jnp.asarray(x))
        for head in HEADS:
            assert rel_err(ours[head], ref[head]) < 1e-4, (head, rel_err(ours[head], ref[head]))


def test_checkpoint_loads_as_its_conversion():
    """A ``torch.save`` of ONet's state dict (the small one; facenet-pytorch's onet.pt, read by the
    tests above, is the published one) loads as the conversion of its weights."""
    config = CONFIGS["small"]
    module, params = load_onet(CHECKPOINTS / "onet.pt", config)
    assert module.config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, convert_onet(random_weights("small"), config))


def test_converter_lists_missing_and_unexpected_keys():
    sd = random_weights("published")
    del sd["dense6_3.weight"], sd["prelu2.weight"]
    sd["conv5.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        convert_onet(sd)
    message = str(info.value)
    for key in ("dense6_3.weight", "prelu2.weight", "conv5.weight"):
        assert key in message


def test_converter_rejects_other_widths():
    sd = reference_state_dict(GROUP, "wide", lambda: _torch_onet(config=ONetConfig(widths=(8, 64, 64, 128))), seed=0)
    with pytest.raises(CheckpointMismatchError, match="conv1/kernel"):
        convert_onet(sd)


def test_missing_file_messages(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="facenet-pytorch"):
        load_onet(tmp_path / "onet.pt")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps facenet-pytorch==2\.6\.0"):
        load_onet()


def test_onet_rejects_wrong_crop_size():
    module = ONet()
    with pytest.raises(ValueError, match="onet_preprocess"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((1, 47, 47, 3)))
