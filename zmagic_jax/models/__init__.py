"""Denoisers and networks: the exact Gaussian-mixture testbed, Stable Diffusion, the CelebA-HQ pixel DDPM
and the ported face networks (ArcFace, BiSeNet, MobileFaceNet, MTCNN ONet)."""
from zmagic_jax.models._gmm import (
    GaussianMixture,
    component_x0_posterior,
    condition_on_linear,
    gaussian_mixture,
    linear_log_evidence,
    log_responsibilities,
    marginal_log_prob,
    marginal_score,
    mixture_denoiser,
    posterior_mean_x0,
    responsibilities,
    sample_mixture,
    select_component,
    x0_posterior,
)
from zmagic_jax.models._stable_diffusion import (
    StableDiffusion,
    decode_latents,
    encode_prompt,
    latent_cfg_correction,
    latent_denoiser,
    load_stable_diffusion,
)
from zmagic_jax.models._arcface import ArcFace, ArcFaceConfig, arcface_preprocess
from zmagic_jax.models._bisenet import BiSeNet, BiSeNetConfig, bisenet_preprocess
from zmagic_jax.models._ddpm_unet import DDPM_CELEBA_HQ, DDPMUNet, DDPMUNetConfig, ddpm_denoiser, timestep_embedding
from zmagic_jax.models._mobilefacenet import MobileFaceNet, MobileFaceNetConfig, landmark_preprocess
from zmagic_jax.models._mtcnn import ONet, ONetConfig, onet_landmarks, onet_preprocess
from zmagic_jax.models._resize import adaptive_avg_pool_torch, check_box, resize_bicubic_torch
from zmagic_jax.models._digits import (
    DigitClassifier,
    DigitClassifierConfig,
    DigitModels,
    DigitSegmenter,
    DigitSegmenterConfig,
)
