"""ArcFace IR-SE port against a PyTorch reference of TreB1eN's ``Backbone(mode='ir_se')`` (random weights
and BatchNorm statistics, eval mode): forward and gradient parity, FreeDoM's preprocessing, converter
round trips and checkpoint errors.

The weights are numpy draws in the reference's layout (``tests/parity.py``); the PyTorch values are
computed live where PyTorch is installed and read from ``tests/references/ports_arcface.safetensors``
elsewhere (``tests/references.py``); the checkpoint is a file ``torch.save`` wrote
(``experiments/make_parity_fixtures.py``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.make_parity_fixtures import PORT_FILE_CONFIGS
from tests.parity import CHECKPOINTS, file_state_dict, reference_state_dict, sketch
from tests.references import torch_reference
from zmagic_jax.models._arcface import ArcFace, ArcFaceConfig, arcface_preprocess
from zmagic_jax.ports._arcface import ARCFACE, convert_arcface, load_arcface
from zmagic_jax.ports._checkpoint import CheckpointMismatchError, convert_file, save_params

GROUP = "ports_arcface"
# Shortcuts by max-pool (stride 2 and 1) and by conv, SE, the NCHW-flatten head; small enough to be quick.
TINY = dict(stage_units=(1, 2, 1, 1), widths=(16, 32, 32, 64), input_size=32, embedding_size=24)


def _torch_arcface(state_dict=None, **kwargs):
    """The PyTorch reference (``TorchArcFace(**kwargs)``), with ``state_dict`` loaded when given."""
    from ports.random_weights import load_weights_
    from ports.torch_arcface import TorchArcFace
    model = TorchArcFace(**kwargs)
    return model if state_dict is None else load_weights_(model, state_dict)


def _relative_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def tiny():
    state_dict = reference_state_dict(GROUP, "tiny", lambda: _torch_arcface(**TINY), seed=1)
    config = ArcFaceConfig(**TINY)
    return state_dict, config, convert_arcface(state_dict, config)


def _torch_preprocess(x0, size):
    """FreeDoM's ``IDLoss.extract_feats`` before the network (NCHW)."""
    import torch
    if x0.shape[2] != 256:
        x0 = torch.nn.AdaptiveAvgPool2d((256, 256))(x0)
    return torch.nn.AdaptiveAvgPool2d((size, size))(x0[:, :, 35:223, 32:220])


def test_embedding_and_identity_gradient_match_torch(tiny):
    """Embeddings of FreeDoM's input and d/dx0 of its residual norm ``|e(ref) - e(x0)|`` (through
    preprocessing and network), for a batch of two 240x240 images; one compiled function."""
    state_dict, config, params = tiny
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (2, 240, 240, 3)).astype(np.float32)  # not 256: FreeDoM's pool to 256 first
    target = rng.normal(size=(2, TINY["embedding_size"])).astype(np.float32)  # stands for e(ref)

    def energy(p, x):
        embedding = ArcFace(config).apply({"params": p}, arcface_preprocess(x, size=32))
        return jnp.linalg.norm(target - embedding), embedding

    def torch_values():
        import torch
        xt = torch.from_numpy(x0).permute(0, 3, 1, 2).requires_grad_(True)
        embedding = _torch_arcface(state_dict, **TINY)(_torch_preprocess(xt, 32))
        value = torch.linalg.norm(torch.from_numpy(target) - embedding)
        value.backward()
        return dict(embedding=embedding.detach().numpy(), value=value.detach().numpy(),
                    gradient=sketch(xt.grad.permute(0, 2, 3, 1).numpy()))

    (value, embedding), grad = jax.jit(jax.value_and_grad(energy, argnums=1, has_aux=True))(params, x0)
    ref = torch_reference(GROUP, "identity", torch_values)
    assert embedding.shape == (2, TINY["embedding_size"])
    assert _relative_error(embedding, ref["embedding"]) < 1e-4
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0, rtol=1e-5)
    assert abs(float(value) - float(ref["value"])) < 1e-4 * float(ref["value"])
    assert _relative_error(sketch(grad), ref["gradient"]) < 1e-4


@pytest.mark.parametrize("side", [256, 320, 200])
def test_preprocess_matches_freedom(side):
    x0 = np.random.default_rng(side).uniform(-1, 1, (2, side, side, 3)).astype(np.float32)

    def torch_values():
        import torch
        return sketch(_torch_preprocess(torch.from_numpy(x0).permute(0, 3, 1, 2), 112).permute(0, 2, 3, 1).numpy())

    ours = np.asarray(arcface_preprocess(x0))
    assert ours.shape == (2, 112, 112, 3)
    np.testing.assert_allclose(sketch(ours), torch_reference(GROUP, f"preprocess/{side}", torch_values),
                               atol=2e-6, rtol=0)


def test_ir_se50_parity():
    """The published layout (IR-SE50, 112x112, 44M parameters, the Linear(512*7*7, 512) head over
    PyTorch's NCHW flatten) converts completely and matches PyTorch."""
    state_dict = reference_state_dict(GROUP, "ir_se50", lambda: _torch_arcface(num_layers=50), seed=2)
    assert sum(v.size for k, v in state_dict.items() if not k.endswith("num_batches_tracked")) > 43_000_000
    params = convert_arcface(state_dict)
    x = np.random.default_rng(3).uniform(-1, 1, (1, 112, 112, 3)).astype(np.float32)

    def torch_values():
        import torch
        with torch.no_grad():
            return _torch_arcface(state_dict, num_layers=50)(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()

    ours = jax.jit(ArcFace().apply)({"params": params}, x)
    assert ours.shape == (1, 512)
    assert _relative_error(ours, torch_reference(GROUP, "ir_se50", torch_values)) < 1e-4


def test_round_trip_pth_and_safetensors(tmp_path):
    """A ``torch.save`` of the state dict (``model_ir_se50.pth``'s layout) loads as its conversion;
    converted to ``.safetensors``, it loads again without the config, which the file records."""
    config = PORT_FILE_CONFIGS["arcface"]
    params = convert_arcface(file_state_dict(GROUP, "arcface"), config)
    module, loaded = load_arcface(CHECKPOINTS / "arcface.pth", config)
    assert module.config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    convert_file(ARCFACE, CHECKPOINTS / "arcface.pth", tmp_path / "arcface.safetensors", config)
    module, reloaded = load_arcface(tmp_path / "arcface.safetensors")
    assert module.config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, params)


def test_missing_file_names_file_and_source(tmp_path):
    for name in ("model_ir_se50.pth", "arcface.safetensors"):
        with pytest.raises(FileNotFoundError, match="InsightFace_Pytorch") as info:
            load_arcface(tmp_path / name)
        assert name in str(info.value) and "IR-SE" in str(info.value)


def test_wrong_architecture_names_keys(tiny, tmp_path):
    state_dict, config, params = tiny
    shallower = ArcFaceConfig(**{**TINY, "stage_units": (1, 1, 1, 1)})
    with pytest.raises(CheckpointMismatchError, match=r"not used by the architecture \(\d+\): body\.4\."):
        convert_arcface(state_dict, shallower)
    deeper = ArcFaceConfig(**{**TINY, "stage_units": (1, 2, 2, 1)})
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint .*body\.5\.res_layer\.0\.weight"):
        convert_arcface(state_dict, deeper)
    wider = ArcFaceConfig(**{**TINY, "widths": (16, 32, 32, 128)})
    shapes = r"body_4/res_conv1/kernel: shape \(3, 3, 32, 64\), expected \(3, 3, 32, 128\)"
    with pytest.raises(CheckpointMismatchError, match=shapes):
        convert_arcface(state_dict, wider)
    save_params(tmp_path / "tiny.safetensors", params)
    with pytest.raises(CheckpointMismatchError, match="body_5"):
        load_arcface(tmp_path / "tiny.safetensors", deeper)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="num_layers"):
        ArcFaceConfig(num_layers=34)
    with pytest.raises(ValueError, match="unit count"):
        ArcFaceConfig(stage_units=(1, 2, 3))
    with pytest.raises(ValueError, match="112, 112, 3"):
        jax.eval_shape(ArcFace().init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="arcface_preprocess"):
        arcface_preprocess(jnp.zeros((256, 256, 3)))
