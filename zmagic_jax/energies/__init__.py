"""Building blocks of perception energies: PyTorch-exact bicubic resize, normalisation, Gram matrices."""
from zmagic_jax.energies._image import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    bicubic_matrix,
    gram_matrix,
    normalize_signed,
    resize_bicubic,
)
from zmagic_jax.energies._clip import (
    Clip,
    clip_content_energy,
    clip_content_loss,
    clip_image_input,
    clip_style_energy,
    clip_style_features,
    clip_style_loss,
    clip_text_distance,
    clip_text_energy,
    image_embedding,
    load_clip,
    text_embedding,
)
