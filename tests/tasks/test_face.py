"""Face tasks end to end on tiny random networks of the real architectures (16x16 DDPM UNet of the
ermongroup family, IR-SE ArcFace, BiSeNet, MobileFaceNet, MTCNN ONet), saved as converted files.

The programs compiled here are shared by the CLI and experiment tests through the face module's
process-wide cache (same architectures and static settings), so each compiles once."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import FAST_COMPILE
from zmagic_jax._io import MARKER
from zmagic_jax.energies import (Net, face_id_energy, face_landmarks, face_parsing_energy, identity_distance,
                                 identity_embedding, landmark_energy, parsing_logits)
from zmagic_jax.models import landmark_preprocess
from zmagic_jax.tasks import FaceReferences, FaceSettings, load_face_models, run_faces, save_faces

RESOLUTION = 16
STEPS = 2  # grid t = 500, 0: the first step is inside every condition's window (t > stop)
# One seed, two steps of tiny networks: running takes milliseconds, so the programs compile without
# XLA's expensive passes (a third of the compile time; same graph, same dtype).


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from experiments.tiny_models import save_tiny_face_models
    root = tmp_path_factory.mktemp("tiny_face")
    paths = save_tiny_face_models(root, resolution=RESOLUTION, clip=False)
    models = load_face_models(paths["unet"], bisenet=paths["bisenet"], arcface=paths["arcface"],
                              landmarks=paths["landmarks"])
    rng = np.random.default_rng(0)
    coarse = rng.uniform(-1, 1, (4, 4, 3))
    reference = np.kron(coarse, np.ones((RESOLUTION // 4, RESOLUTION // 4, 1))).astype(np.float32)
    from PIL import Image
    Image.fromarray(np.round((reference + 1) * 127.5).astype(np.uint8)).save(root / "reference.png")
    return models, paths, reference, root


@pytest.fixture(scope="session")
def id_landmarks_runs(tiny):
    models, _, reference, _ = tiny
    settings = FaceSettings(task="id_landmarks", num_steps=STEPS, seeds=(0,))
    runs = [("none", (0, 1)), ("independent", (0, 1)), ("dependent", (0, 1))]
    if os.environ.get("ZMAGIC_SLOW_TESTS"):
        # multi end to end is the generic Multi (tests/schemes, the digits task runs it end to end on
        # a real UNet) over the face conditions the other runs use; test_multi_guides_every_condition
        # checks what the recipe builds
        runs += [("multi", (0, 1)), ("dependent", (1, 0))]
    references = FaceReferences(identity=reference, parsing=reference, landmarks=reference)
    return run_faces(models, settings, references, runs, compiler_options=FAST_COMPILE), references


def test_every_scheme_runs_end_to_end_with_finite_guidance(id_landmarks_runs, tmp_path):
    result, references = id_landmarks_runs
    plain = result.samples["none"].images
    assert set(result.samples) >= {"none", "independent", "dependent_identity_landmarks"}
    for label, samples in result.samples.items():
        assert samples.images.shape == (1, RESOLUTION, RESOLUTION, 3)
        assert np.all(np.isfinite(samples.images))
        trace = samples.trace
        assert trace.finite.all()
        if label == "none":
            assert not trace.guided.any()
            continue
        assert trace.guided[0].tolist() == [True, False]  # guided for t > stop only
        if samples.scheme == "dependent":  # what each condition contributes: the leader's d, the follower's term II
            leader, follower = samples.order
            norms = np.array([trace.displacement_norms[0, 0, leader], trace.term2_norms[0, 0, leader, follower]])
        else:
            norms = trace.displacement_norms[0, 0]
        assert np.all(np.isfinite(norms)) and np.all(norms > 0), (label, norms)
        assert np.max(np.abs(samples.images - plain)) > 1e-4, label
        for values in result.metrics[label].values():
            assert values.shape == (1,) and np.all(np.isfinite(values))
    report = save_faces(tmp_path / "out", result, references)
    names = sorted(os.listdir(tmp_path / "out"))
    assert "grid.png" in names and "metrics.json" in names
    assert {entry["file"] for entry in report["images"]} <= set(names)
    stored = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(stored["runs"]) == set(result.samples)
    assert set(stored["runs"]["dependent_identity_landmarks"]["mean"]) == {"identity_distance", "landmark_distance"}


def test_multi_guides_every_condition(tiny, id_landmarks_runs):
    """What the recipe hands the sampling program for ``multi``: CAGrad over both face conditions
    with the same energies and rules as the independent run (traced only, not compiled)."""
    import zmagic_jax as zm
    from zmagic_jax.tasks import _face

    models, _, reference, _ = tiny
    references = id_landmarks_runs[1]
    settings = FaceSettings(task="id_landmarks", num_steps=STEPS, seeds=(0,))
    multi = _face._problem(models, settings, references, "multi")[0][3]
    independent = _face._problem(models, settings, references, "independent")[0][3]
    assert isinstance(multi, zm.schemes.Multi) and float(multi.c) == 0.5
    assert [c.name for c in multi.conditions] == [c.name for c in independent.conditions] == list(settings.conditions)
    for a, b in zip(multi.conditions, independent.conditions):
        assert a.rule == b.rule and jax.tree.structure(a.params) == jax.tree.structure(b.params)
    x = jnp.asarray(reference)
    ctx = zm.step_context(models.betas, settings.grid(models.betas), 0)
    den = _face._problem(models, settings, references, "multi")[0][2]
    shapes = jax.eval_shape(lambda x: zm.direction(x, ctx, jnp.zeros_like(x), scheme=multi, denoiser=den,
                                                   sampler=zm.eta_mixing(settings.eta)), x)
    assert shapes[1].shape == x.shape and shapes[2].term2_norms.shape == (2, 2)


def test_dependent_order_changes_which_condition_leads(tiny):
    models, _, reference, _ = tiny
    with pytest.raises(ValueError, match="order must be"):
        FaceSettings(task="id_landmarks", order=(0, 0))
    with pytest.raises(ValueError, match="two conditions"):
        FaceSettings(task="text_seg_id", scheme="dependent")
    from zmagic_jax.tasks import run_label
    settings = FaceSettings(task="id_landmarks")
    assert run_label("dependent", (1, 0), settings) == "dependent_landmarks_identity"


def test_missing_network_and_reference_are_named(tiny):
    models, _, reference, _ = tiny
    settings = FaceSettings(task="seg_text", num_steps=STEPS)
    with pytest.raises(ValueError, match="needs the clip network"):
        run_faces(models, settings, FaceReferences(parsing=reference))
    settings = FaceSettings(task="id_landmarks", num_steps=STEPS)
    with pytest.raises(ValueError, match="needs the landmarks reference"):
        run_faces(models, settings, FaceReferences(identity=reference))


def test_face_energies_are_freedom_residual_norms(tiny):
    models, _, reference, _ = tiny
    other = jnp.asarray(np.flip(reference, axis=1).copy())
    ref = jnp.asarray(reference)
    e_id = face_id_energy(models.arcface, ref)
    cos_distance = identity_distance(models.arcface, other, ref)
    # unit embeddings: |a - b| = sqrt(2 (1 - cos))
    np.testing.assert_allclose(e_id(other), jnp.sqrt(2.0 * cos_distance), rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(identity_embedding(models.arcface, other)), 1.0, rtol=1e-5)
    e_seg = face_parsing_energy(models.parser, ref, size=32)
    expected = jnp.linalg.norm(parsing_logits(models.parser, ref, 32) - parsing_logits(models.parser, other, 32))
    np.testing.assert_allclose(e_seg(other), expected, rtol=1e-5)
    e_lm = landmark_energy(models.landmarks, ref, box=(2, 2, 12, 12))
    points = face_landmarks(models.landmarks, other, box=(2, 2, 12, 12))
    assert points.shape == (68, 2)
    crop = landmark_preprocess(other[None], (2, 2, 12, 12), models.landmarks.module.config.input_size)
    raw = models.landmarks.module.apply({"params": models.landmarks.params}, crop)[0]
    np.testing.assert_allclose(points, raw.reshape(68, 2) * 12 + 2, rtol=1e-5, atol=1e-5)
    # At the reference every energy vanishes (up to the rounding of compiled vs eager features) and
    # its gradient is finite; elsewhere the gradient is non-zero.
    for energy in (e_id, e_seg, e_lm):
        value_and_grad = jax.jit(jax.value_and_grad(energy))
        value, grad = value_and_grad(ref)
        assert abs(float(value)) < 1e-4 * float(energy(other))
        assert np.all(np.isfinite(grad))
        assert float(jnp.max(jnp.abs(value_and_grad(other)[1]))) > 0


def test_onet_landmark_energy_uses_real_weights(tiny):
    if importlib.util.find_spec("facenet_pytorch") is None:
        pytest.skip("facenet-pytorch (installed by `make`) ships the ONet weights")
    from zmagic_jax.ports import load_onet
    onet = Net(*load_onet())
    face = jnp.asarray(tiny[2])
    image = jax.image.resize(face, (48, 48, 3), "linear")
    points = face_landmarks(onet, image, kind="onet")
    assert points.shape == (5, 2) and np.all((points >= 0) & (points <= 48))
    energy = landmark_energy(onet, image, kind="onet")
    assert np.isfinite(jax.grad(energy)(image[::-1])).all()


def test_cli_face_writes_pngs_grid_and_metrics(tiny, tmp_path, capsys):
    from zmagic_jax.cli import main
    _, paths, _, root = tiny
    out = tmp_path / "face"
    code = main(["face", "--task", "id_landmarks", "--unet", str(paths["unet"]), "--arcface", str(paths["arcface"]),
                 "--landmarks", str(paths["landmarks"]), "--reference", str(root / "reference.png"),
                 "--scheme", "independent", "--steps", str(STEPS), "--seeds", "0", "--out", str(out)])
    assert code == 0
    assert sorted(os.listdir(out)) == [MARKER, "grid.png", "metrics.json", "seed0_independent.png", "seed0_none.png"]
    report = json.loads((out / "metrics.json").read_text())
    assert report["runs"]["independent"]["guided_steps"] == 1
    assert "identity_distance" in capsys.readouterr().out


def test_cli_face_errors_name_the_flag(tiny, tmp_path, capsys):
    from zmagic_jax.cli import main
    _, paths, _, root = tiny
    base = ["face", "--unet", str(paths["unet"]), "--out", str(tmp_path / "x")]
    cases = [(["--arcface", str(paths["arcface"]), "--landmarks", str(paths["landmarks"])], "--reference"),
             (["--landmarks", str(paths["landmarks"]), "--reference", str(root / "reference.png")], "--arcface"),
             (["--arcface", str(root / "missing.pth"), "--landmarks", str(paths["landmarks"]),
               "--reference", str(root / "reference.png")], "missing.pth"),
             (["--arcface", str(paths["landmarks"]), "--landmarks", str(paths["landmarks"]),
               "--reference", str(root / "reference.png")], "mobilefacenet params, not arcface"),
             (["--arcface", str(paths["arcface"]), "--landmarks", str(paths["landmarks"]),
               "--reference", str(root / "reference.png"), "--steps", "1"], "num_steps")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "x").exists()


def test_face_tables_protocol_runs_on_tiny_models(tiny, tmp_path, monkeypatch):
    from experiments import face_tables
    from experiments.face_tables import markdown_table, run_protocol

    def shared(*args, **kwargs):  # the programs id_landmarks_runs compiled
        return run_faces(*args, compiler_options=FAST_COMPILE, **kwargs)
    monkeypatch.setattr(face_tables, "run_faces", shared)
    models, _, reference, _ = tiny
    settings = FaceSettings(task="id_landmarks", num_steps=STEPS, seeds=(0,))
    references = [reference, np.flip(reference, axis=0).copy()]
    report = run_protocol(models, settings, references, [("none", (0, 1)), ("independent", (0, 1))],
                          tmp_path / "table", progress=lambda label: None)
    results = report["results"]
    assert set(results) == {"none", "independent"}
    assert results["independent"]["identity_distance"]["n"] == 2
    assert np.isfinite(results["none"]["frechet_arcface"])
    assert len(os.listdir(tmp_path / "table" / "images" / "independent")) == 2
    assert "| independent |" in markdown_table(results)
