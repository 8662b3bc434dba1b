"""Denoisers and networks: the exact Gaussian-mixture testbed, Stable Diffusion (the library's own Flax UNet,
VAE and CLIP), the CelebA-HQ pixel DDPM and the ported face networks (ArcFace, BiSeNet, MobileFaceNet, MTCNN ONet)."""
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
    encode_image,
    encode_prompt,
    latent_cfg_correction,
    latent_denoiser,
    load_stable_diffusion,
    v_to_eps,
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
from zmagic_jax.models._unet2d import (
    AttentionLayer,
    UNet2DConditionConfig,
    UNet2DConditionModel,
    attention_layers,
    select_attention,
    unet_apply,
    unet_config_from_dict,
)
from zmagic_jax.models._autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, vae_config_from_dict
from zmagic_jax.models._sd_convert import (
    unet_params_from_torch,
    unet_torch_state_dict,
    vae_params_from_torch,
    vae_torch_state_dict,
)
from zmagic_jax.models._tokenizer import ClipTokenizer
from zmagic_jax.models._attention import attention, attention_scores
from zmagic_jax.models._clip import (
    CLIPModel,
    CLIPTextConfig,
    CLIPTextTransformer,
    CLIPVisionConfig,
    CLIPVisionTransformer,
    clip_configs_from_dict,
    clip_params_from_torch,
    clip_torch_state_dict,
)
from zmagic_jax.models._clip import (
    CLIPModel,
    CLIPModelOutput,
    CLIPTextConfig,
    CLIPTextTransformer,
    CLIPTransformerOutput,
    CLIPVisionConfig,
    CLIPVisionTransformer,
    clip_configs_from_dict,
    clip_param_shapes,
    clip_params_from_torch,
    clip_torch_state_dict,
)
from zmagic_jax.models._tokenizer import ClipTokenizer
