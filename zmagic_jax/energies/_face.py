"""Face energies on ``x0`` in ``[-1, 1]`` (one ``(H, W, 3)`` sample): parsing, identity, landmarks.

FreeDoM's face guidance (``reference/guidance_peers.md`` §1.3) uses the un-squared L2 norm of a
residual between the network's output on the reference and on ``x0|t``:

* segmentation: BiSeNet main logits at 512x512 (bicubic resize, ImageNet statistics in ``[-1, 1]``),
  ``E = || logits(ref) - logits(x0) ||_2``;
* identity: ArcFace IR-SE50 unit embeddings (crop rows 35:223, cols 32:220, adaptive average pool to
  112), ``E = || e(ref) - e(x0) ||_2 = sqrt(2 (1 - cos))``;
* landmarks: a landmark regressor on a fixed face box of the reference (MobileFaceNet, 68 points, or
  MTCNN's ONet, 5 points), ``E = || p(ref) - p(x0) ||_2`` over the pixel coordinates.

Networks come as :class:`Net` (a Flax module and its params). Every energy closes over the
reference's features, computed once when the energy is built (inside ``jit`` when the params are
program arguments). The matching metrics (:func:`parsing_mse`, :func:`identity_distance`,
:func:`landmark_distance`) are what the paper's tables report.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from zmagic_jax.contracts import Energy, static_partial
from zmagic_jax.energies._image import check_one_image, safe_norm
from zmagic_jax.models._arcface import arcface_preprocess
from zmagic_jax.models._bisenet import bisenet_preprocess
from zmagic_jax.models._mobilefacenet import landmark_preprocess
from zmagic_jax.models._mtcnn import onet_landmarks, onet_preprocess
from zmagic_jax.models._layers import Net
from zmagic_jax.models._resize import check_box


LANDMARK_NETS = ("mobilefacenet", "onet")


def _check_image(image, who: str):
    return check_one_image(image, who, 3)


def parsing_logits(parser: Net, image, size: int = 512):
    """BiSeNet main logits ``(size, size, classes)`` of one image in ``[-1, 1]`` (FreeDoM: bicubic
    resize to 512, ImageNet normalisation adapted to ``[-1, 1]``)."""
    image = _check_image(image, "parsing_logits")
    return parser.module.apply({"params": parser.params}, bisenet_preprocess(image[None], size))[0]


def _parsing_energy(module, size, params, x0):
    weights, reference = params
    return safe_norm(reference - parsing_logits(Net(module, weights), x0, size))


# The references of the energies are computed once per call, compiled (eager Flax would dispatch
# every layer separately); the module is static, the weights and the image are arguments.
@functools.partial(jax.jit, static_argnums=(0, 3))
def _parsing_reference(module, params, image, size):
    return parsing_logits(Net(module, params), image, size)


@functools.partial(jax.jit, static_argnums=0)
def _identity_reference(module, params, image):
    return identity_embedding(Net(module, params), image)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _landmark_reference(module, params, image, box, kind):
    return face_landmarks(Net(module, params), image, box, kind)


def face_parsing_energy(parser: Net, reference_image, size: int = 512) -> Energy:
    """``E(x0) = || logits(ref) - logits(x0) ||_2`` over all pixels and classes (FreeDoM); params
    ``(parser.params, reference logits)``."""
    return Energy(static_partial(_parsing_energy, parser.module, int(size)),
                  (parser.params, _parsing_reference(parser.module, parser.params, reference_image, int(size))))


def parsing_mse(parser: Net, image, reference_image, size: int = 512):
    """Mean squared difference of the parsing logits of ``image`` and the reference."""
    return jnp.mean(jnp.square(parsing_logits(parser, image, size) - parsing_logits(parser, reference_image, size)))


def parsing_labels(parser: Net, image, size: int = 512):
    """Per-pixel class ids ``(size, size)`` (argmax of the main logits), for pictures of the map."""
    return jnp.argmax(parsing_logits(parser, image, size), axis=-1)


def identity_embedding(arcface: Net, image):
    """ArcFace unit embedding ``(512,)`` of one image in ``[-1, 1]`` (FreeDoM's crop and pool)."""
    image = _check_image(image, "identity_embedding")
    return arcface.module.apply({"params": arcface.params},
                               arcface_preprocess(image[None], arcface.module.config.input_size))[0]


def _identity_energy(module, params, x0):
    weights, reference = params
    return safe_norm(reference - identity_embedding(Net(module, weights), x0))


def face_id_energy(arcface: Net, reference_image) -> Energy:
    """``E(x0) = || e(ref) - e(x0) ||_2`` with ArcFace unit embeddings (FreeDoM); params
    ``(arcface.params, reference embedding)``."""
    return Energy(static_partial(_identity_energy, arcface.module),
                  (arcface.params, _identity_reference(arcface.module, arcface.params, reference_image)))


def identity_distance(arcface: Net, image, reference_image):
    """``1 - cos(e(image), e(ref))`` (the paper's ID distance; embeddings are unit vectors)."""
    return 1.0 - jnp.dot(identity_embedding(arcface, image), identity_embedding(arcface, reference_image))


def face_landmarks(net: Net, image, box: Optional[Sequence[int]] = None, kind: str = "mobilefacenet"):
    """Landmark pixel coordinates ``(K, 2)`` as ``(x, y)`` of one image in ``[-1, 1]``.

    ``box`` is the face box ``(top, left, height, width)`` the regressor sees (FreeDoM takes it from a
    detector on the reference, once); ``None`` = the whole image. ``kind``: ``"mobilefacenet"`` (68
    points) or ``"onet"`` (MTCNN's 5 points).
    """
    image = _check_image(image, "face_landmarks")
    height, width = image.shape[:2]
    box = (0, 0, height, width) if box is None else check_box(box, height, width, "face_landmarks")
    if kind == "mobilefacenet":
        size = net.module.config.input_size
        out = net.module.apply({"params": net.params}, landmark_preprocess(image[None], box, size))[0]
        points = out.reshape(-1, 2)
        return points * jnp.asarray([box[3], box[2]], points.dtype) + jnp.asarray([box[1], box[0]], points.dtype)
    if kind == "onet":
        out = net.module.apply({"params": net.params}, onet_preprocess(image[None], box, net.module.config.input_size))
        return onet_landmarks(out, box)[0]
    raise ValueError(f"face_landmarks: kind must be one of {LANDMARK_NETS}; got {kind!r}.")


def _landmark_energy(module, box, kind, params, x0):
    weights, reference = params
    return safe_norm(reference - face_landmarks(Net(module, weights), x0, box, kind))


def landmark_energy(net: Net, reference_image, box: Optional[Sequence[int]] = None,
                    kind: str = "mobilefacenet") -> Energy:
    """``E(x0) = || p(ref) - p(x0) ||_2`` over all landmark coordinates (FreeDoM); params
    ``(net.params, reference landmarks)``."""
    box = None if box is None else tuple(int(v) for v in box)
    return Energy(static_partial(_landmark_energy, net.module, box, kind),
                  (net.params, _landmark_reference(net.module, net.params, reference_image, box, kind)))


def landmark_distance(net: Net, image, reference_image, box: Optional[Sequence[int]] = None,
                      kind: str = "mobilefacenet"):
    """Mean Euclidean distance in pixels between corresponding landmarks of ``image`` and the reference."""
    difference = face_landmarks(net, image, box, kind) - face_landmarks(net, reference_image, box, kind)
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(difference), axis=-1)))
