"""MobileFaceNet landmark port against a PyTorch reference of cunjian's ``MobileFaceNet([112, 112], 136)``
(random weights and BatchNorm statistics, eval mode): forward parity at the real size, forward and gradient
parity through FreeDoM's preprocessing on a tiny variant, converter round trips and checkpoint errors.

The weights are numpy draws in the reference's layout (``tests/parity.py``); the PyTorch values are
computed live where PyTorch is installed and read from ``tests/references/ports_mobilefacenet.safetensors``
elsewhere (``tests/references.py``); the checkpoint is a file ``torch.save`` wrote
(``experiments/make_parity_fixtures.py``)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.make_parity_fixtures import PORT_FILE_CONFIGS
from tests.parity import CHECKPOINTS, file_state_dict, reference_state_dict, sketch
from tests.references import torch_reference
from zmagic_jax.models._mobilefacenet import MobileFaceNet, MobileFaceNetConfig, landmark_preprocess
from zmagic_jax.ports._checkpoint import CheckpointMismatchError, convert_file, save_params
from zmagic_jax.ports._mobilefacenet import MOBILEFACENET, convert_mobilefacenet, load_mobilefacenet

GROUP = "ports_mobilefacenet"
TINY = dict(input_size=32, widths=(8, 16, 32), expansions=(16, 16, 32, 32, 32, 32), residual_units=(1, 2, 1),
            num_outputs=10)
BOX = (40, 60, 150)  # FreeDoM's square face box: top, left, size


def _torch_mobilefacenet(state_dict=None, **kwargs):
    """The PyTorch reference (``TorchMobileFaceNet(**kwargs)``), with ``state_dict`` loaded when given."""
    from ports.random_weights import load_weights_
    from ports.torch_mobilefacenet import TorchMobileFaceNet
    model = TorchMobileFaceNet(**kwargs)
    return model if state_dict is None else load_weights_(model, state_dict)


def _relative_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _torch_preprocess(x0, box, size):
    """FreeDoM's ``FaceLandMarkTool.get_residual`` before the network (NCHW)."""
    import torch
    top, left, side = box
    x = (x0 + 1.0) / 2.0
    return torch.nn.functional.interpolate(x[:, :, top:top + side, left:left + side], size=size, mode="bicubic")


@pytest.fixture(scope="module")
def real():
    state_dict = reference_state_dict(GROUP, "real", _torch_mobilefacenet, seed=3)
    return state_dict, convert_mobilefacenet(state_dict)


def test_real_size_parity(real):
    state_dict, params = real
    x = np.random.default_rng(0).uniform(0, 1, (2, 112, 112, 3)).astype(np.float32)

    def torch_values():
        import torch
        with torch.no_grad():
            landmarks, features = _torch_mobilefacenet(state_dict)(torch.from_numpy(x).permute(0, 3, 1, 2))
        return dict(landmarks=landmarks.numpy(), features_shape=np.array(features.shape))

    ref = torch_reference(GROUP, "real", torch_values)
    assert tuple(ref["features_shape"]) == (2, 512, 7, 7)  # FreeDoM takes output [0], the landmarks
    ours = jax.jit(MobileFaceNet().apply)({"params": params}, x)
    assert ours.shape == (2, 136)
    assert _relative_error(ours, ref["landmarks"]) < 1e-4


def test_tiny_landmarks_and_gradient_match_torch():
    """A tiny variant's landmarks of FreeDoM's input and d/dx0 of its residual norm ``|p(ref) - p(x0)|``
    (through crop, bicubic resize and network) for two 256x256 images; one compiled function.

    (Tiny because in float32 a random-weight network of the real depth has PReLU inputs close enough to 0
    that rounding flips their side: PyTorch's own float32 gradient is then ~1.5e-2 max-relative off its
    float64 one, while the float32 forwards agree to ~1e-6.)"""
    state_dict = reference_state_dict(GROUP, "tiny", lambda: _torch_mobilefacenet(**TINY), seed=4)
    config = MobileFaceNetConfig(**TINY)
    params = convert_mobilefacenet(state_dict, config)
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (2, 256, 256, 3)).astype(np.float32)
    target = rng.uniform(0, 1, (2, TINY["num_outputs"])).astype(np.float32)  # stands for p(ref)

    def energy(p, x):
        landmarks = MobileFaceNet(config).apply({"params": p}, landmark_preprocess(x, BOX, size=32))
        return jnp.linalg.norm(target - landmarks), landmarks

    def torch_values():
        import torch
        xt = torch.from_numpy(x0).permute(0, 3, 1, 2).requires_grad_(True)
        landmarks = _torch_mobilefacenet(state_dict, **TINY)(_torch_preprocess(xt, BOX, 32))[0]
        value = torch.linalg.norm(torch.from_numpy(target) - landmarks)
        value.backward()
        return dict(landmarks=landmarks.detach().numpy(), value=value.detach().numpy(),
                    gradient=sketch(xt.grad.permute(0, 2, 3, 1).numpy()))

    (value, landmarks), grad = jax.jit(jax.value_and_grad(energy, argnums=1, has_aux=True))(params, x0)
    ref = torch_reference(GROUP, "tiny", torch_values)
    assert landmarks.shape == (2, TINY["num_outputs"])
    assert _relative_error(landmarks, ref["landmarks"]) < 1e-4
    assert abs(float(value) - float(ref["value"])) < 1e-4 * float(ref["value"])
    assert _relative_error(sketch(grad), ref["gradient"]) < 1e-4


def test_preprocess_matches_freedom():
    x0 = np.random.default_rng(2).uniform(-1, 1, (2, 256, 256, 3)).astype(np.float32)

    def torch_values():
        import torch
        return sketch(_torch_preprocess(torch.from_numpy(x0).permute(0, 3, 1, 2), BOX, 112).permute(0, 2, 3, 1).numpy())

    ref = torch_reference(GROUP, "preprocess", torch_values)
    for box in (BOX, BOX + (BOX[2],)):  # (top, left, size) and (top, left, height, width)
        ours = np.asarray(landmark_preprocess(x0, box))
        assert ours.shape == (2, 112, 112, 3)
        # float32 PyTorch rounds its bicubic coordinates (exactness in float64: tests/models/test_resize.py)
        np.testing.assert_allclose(sketch(ours), ref, atol=5e-5, rtol=0)
    for bad in ((200, 60, 150), (-1, 0, 10), (0, 0, 0), (1, 2)):
        with pytest.raises(ValueError, match="inside the 256x256 image"):
            landmark_preprocess(x0, bad)


def test_round_trip_pth_tar_and_safetensors(tmp_path):
    """The published file is a training checkpoint ``{'state_dict': ..., 'epoch': ...}``, of the
    published config unless another is given."""
    config, path = PORT_FILE_CONFIGS["mobilefacenet"], CHECKPOINTS / "mobilefacenet.pth.tar"
    params = convert_mobilefacenet(file_state_dict(GROUP, "mobilefacenet"), config)
    module, loaded = load_mobilefacenet(path, config)
    assert module.config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    with pytest.raises(CheckpointMismatchError, match=re.escape(f"with {MobileFaceNetConfig()}")):
        load_mobilefacenet(path)
    convert_file(MOBILEFACENET, path, tmp_path / "mobilefacenet.safetensors", config)
    _, reloaded = load_mobilefacenet(tmp_path / "mobilefacenet.safetensors")
    jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, params)


def test_missing_file_names_file_and_source(tmp_path):
    for name in ("mobilefacenet_model_best.pth.tar", "mobilefacenet.safetensors"):
        with pytest.raises(FileNotFoundError, match="pytorch_face_landmark") as info:
            load_mobilefacenet(tmp_path / name)
        assert name in str(info.value) and "MobileFaceNet" in str(info.value)


def test_wrong_architecture_names_keys(real, tmp_path):
    state_dict, params = real
    fewer = MobileFaceNetConfig(residual_units=(4, 5, 2))
    with pytest.raises(CheckpointMismatchError, match=r"not used by the architecture .*conv_4\.model\.5\.conv\.bn"):
        convert_mobilefacenet(state_dict, fewer)
    more = MobileFaceNetConfig(residual_units=(4, 6, 3))
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint .*conv_5\.model\.2\.conv\.bn"):
        convert_mobilefacenet(state_dict, more)
    five_points = MobileFaceNetConfig(num_outputs=10)
    with pytest.raises(CheckpointMismatchError, match=r"gdc_linear/kernel: shape \(512, 136\), expected \(512, 10\)"):
        convert_mobilefacenet(state_dict, five_points)
    save_params(tmp_path / "mfn.safetensors", params)
    with pytest.raises(CheckpointMismatchError, match="conv_5_2"):
        load_mobilefacenet(tmp_path / "mfn.safetensors", more)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        MobileFaceNetConfig(input_size=100)
    with pytest.raises(ValueError, match="3 widths"):
        MobileFaceNetConfig(widths=(64, 128))
    with pytest.raises(ValueError, match=r"112, 112, 3"):
        jax.eval_shape(MobileFaceNet().init, jax.random.key(0), jnp.zeros((1, 96, 96, 3)))
