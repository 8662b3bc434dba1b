"""Cost of one guided Stable Diffusion step (text + style), JAX against PyTorch eager.

    python experiments/bench_text_style.py --out experiments/results/bench_text_style.json [--quick]

The tiny random SD and CLIP of ``tiny_models.py`` (UNet 32/64 channels on 4x8x8 latents, VAE to
16x16x3, CLIP ViT 32x32 patch 8) are built in a temporary folder and loaded through the library's
loaders; PyTorch runs the very same weights (the modules ``tiny_models`` returns). One guided step
at step 50 of a 100-step grid (t = 490), ``ddpm_posterior``, classifier-free guidance w = 5, two
conditions at ``x0|t``: FreeDoM's CLIP style energy (Gram matrix of ``hidden_states[3]`` tokens)
and its CLIP text energy, each ``E(decode(x0))``, ``zm.freedom_rule``.

Sections of the JSON report:

* ``steps``: one jitted ``zm.step`` call per scheme (none / independent / dependent / multi,
  and independent with ``remat``) next to the PyTorch eager step the FreeDoM way
  (``x.requires_grad_()``, CFG in one batched UNet call, Tweedie ``x0``, VAE decode, bicubic
  resize + normalise, energies, ``torch.autograd.grad``, posterior mean minus ``rho grad``),
  all timed in the same rounds; the JAX/PyTorch ratios; compiled memory of every JAX step and
  PyTorch's allocation peak; a check that both frameworks give the same ``x_next``.
* ``parts``: the pieces of the step on their own in both frameworks (UNet forward and gradient,
  VAE decode and gradient, CLIP energies' gradients), to show where time goes.
* ``batch4`` (full run only): the independent step on 4 samples (``vmap`` / a torch batch).
* ``xla_flags`` (full run only): the independent step and its PyTorch twin re-timed in child
  processes under other ``XLA_FLAGS``; each child's own JAX/PyTorch ratio is comparable across
  children even when the machine's load changes between them.

Every jitted JAX function takes the weights (UNet, VAE, CLIP), the prompt embeddings and the
style reference as arguments (the ``zm.Denoiser`` and the conditions' params), as the library's
own programs do: a JAX time is that of the compiled program called with them, the dispatch of
those arguments included; nothing is baked in as a constant. PyTorch holds its weights in its
modules as usual.

Times are medians of ``time.perf_counter`` around ``jax.block_until_ready`` after a warm-up
call, every function of a section called once per round (``bench_schemes.time_round_robin``).
PyTorch uses as many intra-op threads as XLA:CPU (one per CPU of this process's affinity).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from functools import partial
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import zmagic_jax as zm  # noqa: E402
from bench_schemes import (compile_step, machine_info, run_sections, time_round_robin,  # noqa: E402
                           write_report)
from zmagic_jax.contracts import Keyed  # noqa: E402
from zmagic_jax.energies import clip_style_energy, clip_text_energy, load_clip  # noqa: E402
from zmagic_jax.energies._image import CLIP_MEAN, CLIP_STD  # noqa: E402
from zmagic_jax.models import decode_latents, encode_prompt, latent_denoiser, load_stable_diffusion  # noqa: E402
from zmagic_jax.tasks._recipe import sampler_by_name, scheme_by_name  # noqa: E402
from zmagic_jax.tasks._text_style import _decoded  # noqa: E402

NUM_STEPS, MID_STEP = 100, 50
GUIDANCE_SCALE = 5.0
SD_PROMPT, CLIP_PROMPT = "lower newer", "a cat"  # words of the tiny models' toy vocabularies
STYLE_LAYER = 3
RULE_SCALES = (1.0, 0.5)  # freedom_rule scales of style and text: rho_i = sqrt(ab_t) * scale_i
SCHEMES = ("none", "independent", "dependent", "multi")
XLA_FLAG_VARIANTS = ("", "--xla_cpu_use_thunk_runtime=false", "--xla_cpu_multi_thread_eigen=false")


class Config(NamedTuple):
    repeats: int          # timed rounds (median reported)
    schemes: tuple        # JAX schemes of section ``steps``
    remat_schemes: tuple  # schemes also compiled with remat=True
    batch4: bool
    xla_flags: tuple


FULL = Config(repeats=9, schemes=SCHEMES, remat_schemes=("independent", "dependent"), batch4=True,
              xla_flags=XLA_FLAG_VARIANTS)
QUICK = Config(repeats=5, schemes=("none", "independent"), remat_schemes=("independent",), batch4=False,
               xla_flags=())


class Models(NamedTuple):
    sd: object            # zmagic_jax StableDiffusion
    clip: object          # zmagic_jax Clip
    torch_unet: object
    torch_vae: object
    torch_clip: object
    embeds: np.ndarray    # (2, L, D) SD text embeddings of SD_PROMPT and ""
    style_image: np.ndarray  # (32, 32, 3) in [-1, 1]
    x: np.ndarray         # (4, 4, 8, 8) latents at the step's noise level
    ctx: object           # zm.StepContext of the step


def build_models(root: Path) -> Models:
    """Tiny SD + CLIP saved under ``root`` and loaded back: Flax through the library, PyTorch by
    diffusers' / transformers' ``from_pretrained`` of the same folders (frozen: PyTorch
    differentiates only with respect to ``x``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tiny_models import save_tiny_clip, save_tiny_stable_diffusion
    from transformers import CLIPModel

    sd_dirs = save_tiny_stable_diffusion(root / "sd")
    clip_dirs = save_tiny_clip(root / "clip")
    sd = load_stable_diffusion(sd_dirs["path"])
    clip = load_clip(clip_dirs["path"])
    torch_unet = UNet2DConditionModel.from_pretrained(sd_dirs["path"] / "unet")
    torch_vae = AutoencoderKL.from_pretrained(sd_dirs["path"] / "vae")
    torch_clip = CLIPModel.from_pretrained(clip_dirs["path"])
    for module in (torch_unet, torch_vae, torch_clip):
        module.eval().requires_grad_(False)
    contexts = zm.step_contexts(sd.schedule, zm.timestep_grid(sd.schedule.num_train_steps, NUM_STEPS))
    ctx = jax.tree_util.tree_map(lambda a: a[MID_STEP], contexts)
    rng = np.random.default_rng(0)
    style = np.tanh(rng.standard_normal((32, 32, 3))).astype(np.float32)
    x = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    embeds = np.asarray(encode_prompt(sd, [SD_PROMPT, ""]))
    return Models(sd, clip, torch_unet, torch_vae, torch_clip, embeds, style, x, ctx)


# ----------------------------------------------------------------------------- JAX

SAMPLER = sampler_by_name("ddpm_posterior")


def _decoder(m: Models, remat=False):
    """``decoder(vae_params, z) -> image``: the VAE decoder with its weights as an argument."""
    return zm.static_partial(_decoded, Keyed(m.sd.vae, repr(m.sd.vae)), float(m.sd.vae_scaling_factor), remat)


def _of_decoded(decoder, energy_fn, params, z):
    """``E(decode(z))`` of a latent; ``params = (VAE params, the energy's params)``."""
    vae_params, energy_params = params
    return energy_fn(energy_params, decoder(vae_params, z))


def jax_energies(m: Models):
    """The CLIP style and text energies of an image (:class:`zm.Energy`, weights and references in
    their params)."""
    return clip_style_energy(m.clip, m.style_image, STYLE_LAYER), clip_text_energy(m.clip, CLIP_PROMPT)


def jax_conditions(m: Models, remat=False):
    """Style and text conditions on a latent ``x0``: ``E(decode(x0))``, the VAE and CLIP weights
    and the references in their params."""
    decoder = _decoder(m, remat)
    return tuple(zm.condition(name, zm.static_partial(_of_decoded, decoder, energy.fn),
                              zm.freedom_rule(scale), (m.sd.vae_params, energy.params))
                 for name, energy, scale in zip(("style", "text"), jax_energies(m), RULE_SCALES))


def jax_denoiser(m: Models, remat=False):
    return latent_denoiser(m.sd, m.embeds[0], m.embeds[1], GUIDANCE_SCALE, remat=remat)


def _one_step(denoiser, scheme, key, x, ctx):
    return zm.step(key, x[0], ctx, denoiser=denoiser, scheme=scheme, sampler=SAMPLER)[0][None]


def _batch_step(denoiser, scheme, key, x, ctx):
    def one(key, x):
        return zm.step(key, x, ctx, denoiser=denoiser, scheme=scheme, sampler=SAMPLER)[0]
    return jax.vmap(one)(jax.random.split(key, x.shape[0]), x)


def jax_step(m: Models, scheme_name: str, batch: int, remat=False):
    """``(step, (denoiser, scheme))``: ``step(denoiser, scheme, key, x, ctx)`` is one guided step
    of ``zm.step`` (vmapped when ``batch > 1``); the denoiser and the scheme, which carry every
    weight, are its arguments."""
    scheme = scheme_by_name(scheme_name, jax_conditions(m, remat))
    return (_one_step if batch == 1 else _batch_step), (jax_denoiser(m, remat), scheme)


def jax_noise(m: Models, key):
    """The ``sigma_t z`` that ``zm.step`` adds for one sample with ``key``."""
    return SAMPLER.noise_std(m.ctx) * jax.random.normal(jax.random.split(key, 1)[-1], m.x.shape[1:])


def _cfg_forward(denoiser, ctx, x):
    return denoiser(x, ctx.t)


def _cfg_gradient(denoiser, ctx, x):
    return jax.grad(lambda x: jnp.sum(denoiser(x, ctx.t) ** 2))(x)


def _decode(decoder, vae_params, z):
    return decoder(vae_params, z)


def _decode_gradient(decoder, vae_params, z):
    return jax.grad(lambda z: jnp.sum(decoder(vae_params, z) ** 2))(z)


def _energy_gradient(energy, image):
    return jax.grad(energy)(image)


def _weighted_sum_gradient(decoder, denoiser, vae_params, style, text, ctx, x):
    def both(x):
        ab = ctx.alpha_bar
        image = decoder(vae_params, (x - jnp.sqrt(1 - ab) * denoiser(x, ctx.t)) / jnp.sqrt(ab))
        return RULE_SCALES[0] * style(image) + RULE_SCALES[1] * text(image)
    return jax.grad(both)(x)


def jax_parts(m: Models) -> dict:
    """name -> (function, its arguments): the pieces of the guided step, weights as arguments."""
    denoiser, decoder, ctx = jax_denoiser(m), _decoder(m), m.ctx
    style, text = jax_energies(m)
    vae = m.sd.vae_params
    x = jnp.asarray(m.x[0])
    image = jnp.tanh(decode_latents(m.sd, x))
    return {
        "unet_cfg_forward": (_cfg_forward, (denoiser, ctx, x)),
        "unet_cfg_gradient": (_cfg_gradient, (denoiser, ctx, x)),
        "vae_decode": (partial(_decode, decoder), (vae, x)),
        "vae_decode_gradient": (partial(_decode_gradient, decoder), (vae, x)),
        "clip_style_gradient": (_energy_gradient, (style, image)),
        "clip_text_gradient": (_energy_gradient, (text, image)),
        "weighted_sum_gradient": (partial(_weighted_sum_gradient, decoder), (denoiser, vae, style, text, ctx, x)),
    }


# ----------------------------------------------------------------------------- PyTorch

class TorchStep:
    """The FreeDoM-style eager step on a batch ``x`` ``(B, 4, h, w)``.

    ``mode``: ``"none"`` (energies recorded under ``no_grad``, no guidance), ``"sum"``
    (FreeDoM: one ``autograd.grad`` of ``sum_i rho_i E_i``) or ``"per_condition"`` (one
    ``autograd.grad`` per condition, the per-condition gradients the JAX schemes compute and
    report)."""

    def __init__(self, m: Models, mode: str, threads: int):
        import torch
        import torch.nn.functional as F

        self.torch, self.F, self.m, self.mode = torch, F, m, mode
        torch.set_num_threads(threads)
        ctx = m.ctx
        ab, abn = float(ctx.alpha_bar), float(ctx.alpha_bar_next)
        b = 1.0 - ab / abn
        self.t, self.ab = int(ctx.t), ab
        self.c1 = math.sqrt(abn) * b / (1.0 - ab)
        self.c2 = math.sqrt(ab / abn) * (1.0 - abn) / (1.0 - ab)
        self.rhos = [math.sqrt(ab) * s for s in RULE_SCALES]
        self.cond, self.uncond = (torch.from_numpy(e) for e in m.embeds)
        self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        self.size = m.torch_clip.config.vision_config.image_size
        self.scaling = float(m.torch_vae.config.scaling_factor)
        with torch.no_grad():
            ref = torch.from_numpy(m.style_image).permute(2, 0, 1)[None]
            self.gram_ref = self._gram(ref)[0]
            tok = m.clip.tokenizer
            ids = torch.tensor([[tok.bos_token_id] + tok.token_ids(CLIP_PROMPT) + [tok.eos_token_id]])
            text = m.torch_clip.get_text_features(input_ids=ids)
            self.text = getattr(text, "pooler_output", text)[0]  # transformers 5 returns an output

    def _pixels(self, image):
        """FreeDoM's CLIP input: bicubic resize of the [0, 1] image, CLIP normalisation."""
        image = self.F.interpolate((image + 1) / 2, size=(self.size, self.size), mode="bicubic",
                                   align_corners=False)
        return (image - self.mean) / self.std

    def _gram(self, image):
        tokens = self.m.torch_clip.vision_model(pixel_values=self._pixels(image),
                                                output_hidden_states=True).hidden_states[STYLE_LAYER][:, 1:]
        return tokens.transpose(1, 2) @ tokens

    def energies(self, image):
        style = self.torch.linalg.norm(self._gram(image) - self.gram_ref, dim=(1, 2)).sum()
        features = self.m.torch_clip.get_image_features(pixel_values=self._pixels(image))
        features = getattr(features, "pooler_output", features)
        text = self.torch.linalg.norm(self.text - features, dim=-1).sum()
        return style, text

    def __call__(self, x, noise):
        torch = self.torch
        batch = x.shape[0]
        x = x.detach().requires_grad_(self.mode != "none")
        with torch.set_grad_enabled(self.mode != "none"):
            t = torch.full((2 * batch,), self.t)
            context = torch.cat([self.uncond.expand(batch, -1, -1), self.cond.expand(batch, -1, -1)])
            eps_u, eps_c = self.m.torch_unet(torch.cat([x, x]), t, context).sample.chunk(2)
            eps = eps_u + GUIDANCE_SCALE * (eps_c - eps_u)
            x0 = (x - math.sqrt(1.0 - self.ab) * eps) / math.sqrt(self.ab)
            energies = self.energies(self.m.torch_vae.decode(x0 / self.scaling).sample)
            if self.mode == "sum":
                (grad,) = torch.autograd.grad(sum(r * e for r, e in zip(self.rhos, energies)), x)
            elif self.mode == "per_condition":
                grads = [torch.autograd.grad(e, x, retain_graph=i == 0)[0] for i, e in enumerate(energies)]
                grad = sum(r * g for r, g in zip(self.rhos, grads))
            else:
                grad = torch.zeros_like(x)
        return (self.c1 * x0 + self.c2 * x - grad + noise).detach()


def torch_parts(m: Models, threads: int) -> dict:
    """The PyTorch twins of :func:`jax_parts`."""
    import torch

    step = TorchStep(m, "sum", threads)
    x = torch.from_numpy(m.x[0])[None]
    with torch.no_grad():
        image = torch.tanh(m.torch_vae.decode(x / step.scaling).sample)
    t = torch.full((2,), step.t)
    context = torch.cat([step.uncond[None], step.cond[None]])

    def eps(x):
        eps_u, eps_c = m.torch_unet(torch.cat([x, x]), t, context).sample.chunk(2)
        return eps_u + GUIDANCE_SCALE * (eps_c - eps_u)

    def grad(energy):
        def fn(v):
            v = v.detach().requires_grad_()
            return torch.autograd.grad(energy(v), v)[0]
        return fn

    def no_grad(fn):
        return lambda v: torch.no_grad()(fn)(v)

    def both(x):
        x0 = (x - math.sqrt(1 - step.ab) * eps(x)) / math.sqrt(step.ab)
        style, text = step.energies(m.torch_vae.decode(x0 / step.scaling).sample)
        return RULE_SCALES[0] * style + RULE_SCALES[1] * text

    return {
        "unet_cfg_forward": (no_grad(eps), x),
        "unet_cfg_gradient": (grad(lambda x: (eps(x) ** 2).sum()), x),
        "vae_decode": (no_grad(lambda z: m.torch_vae.decode(z / step.scaling).sample), x),
        "vae_decode_gradient": (grad(lambda z: (m.torch_vae.decode(z / step.scaling).sample ** 2).sum()), x),
        "clip_style_gradient": (grad(lambda im: step.energies(im)[0]), image),
        "clip_text_gradient": (grad(lambda im: step.energies(im)[1]), image),
        "weighted_sum_gradient": (grad(both), x),
    }


def torch_peak_bytes(fn, args) -> dict:
    """Approximate peak of PyTorch's CPU tensor allocations during one call, above what was
    live before it: ``torch.profiler`` (``profile_memory=True``) reports each operator's own
    allocated minus freed bytes; their running sum in start-time order is the live-bytes curve at
    operator granularity."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                     if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    tracemalloc.start()
    fn(*args)
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"torch_profiler_peak_bytes": int(peak), "tracemalloc_python_peak_bytes": int(python_peak),
            "method": "torch.profiler(profile_memory=True): running sum of every operator's self "
                      "allocated-minus-freed CPU bytes in start-time order (operator granularity); "
                      "tracemalloc sees Python objects only, not tensor storage",
            "torch_version": torch.__version__}


def _torch_call(fn):
    """Return nothing, so ``jax.block_until_ready`` in the timing loop sees no PyTorch tensor."""
    return lambda *args: (fn(*args), None)[1]


# ----------------------------------------------------------------------------- sections

def xla_threads() -> int:
    """Intra-op threads of XLA:CPU: one per CPU this process may run on."""
    return len(os.sched_getaffinity(0))


def steps_section(m: Models, config: Config, threads: int, batch: int = 1) -> dict:
    """JAX schemes and PyTorch modes timed in the same rounds, with ratios and memory."""
    import torch

    key = jax.random.PRNGKey(7)
    x = jnp.asarray(m.x[:batch])
    noise = np.stack([np.asarray(jax_noise(m, k)) for k in
                      ([key] if batch == 1 else list(jax.random.split(key, batch)))])
    entries, calls = {}, {}
    plan = [(s, False) for s in config.schemes] + [(s, True) for s in config.remat_schemes]
    for scheme, remat in plan:
        label = f"jax_{scheme}" + ("_remat" if remat else "")
        step, weights = jax_step(m, scheme, batch, remat)
        args = (*weights, key, x, m.ctx)
        compiled, seconds, memory = compile_step(step, args)
        calls[label] = (compiled, args)
        entries[label] = {"compile_seconds": seconds, "memory": memory}
    torch_x, torch_noise = torch.from_numpy(m.x[:batch]), torch.from_numpy(noise)
    torch_modes = {"none": "none", "independent_sum": "sum", "independent_per_condition": "per_condition"}
    steps = {name: TorchStep(m, mode, threads) for name, mode in torch_modes.items()}
    for name, step in steps.items():
        calls[f"torch_{name}"] = (_torch_call(step), (torch_x, torch_noise))
        entries[f"torch_{name}"] = {}
    for label, timing in time_round_robin(calls, config.repeats).items():
        entries[label].update(timing)
    # After the timing: running the profiler first slowed the PyTorch steps ~10x in a first run.
    for name, step in steps.items():
        entries[f"torch_{name}"]["memory"] = torch_peak_bytes(step, (torch_x, torch_noise))

    # Same weights, same noise: both frameworks must land on the same x_next.
    jax_next = np.asarray(calls["jax_independent"][0](*calls["jax_independent"][1]))
    torch_next = TorchStep(m, "per_condition", threads)(torch_x, torch_noise).numpy()
    seconds = lambda label: entries[label]["seconds_median"]
    ratios = {f"{j}/torch_{t}": seconds(j) / seconds(f"torch_{t}")
              for j in calls if j.startswith("jax_")
              for t in torch_modes if (t == "none") == (j == "jax_none")}
    memory = {label: entries[label]["memory"].get("temp_size_in_bytes") for label in entries
              if label.startswith("jax_")}
    return {"batch": batch, "functions": entries, "ratios_jax/torch": ratios, "jax_temp_bytes": memory,
            "remat_temp_ratio": {f"jax_{s}_remat/jax_{s}": memory[f"jax_{s}_remat"] / memory[f"jax_{s}"]
                                 for s in config.remat_schemes},
            "agreement": {"max_abs_diff_x_next_independent": float(np.max(np.abs(jax_next - torch_next))),
                          "max_abs_x_next": float(np.max(np.abs(torch_next)))}}


def parts_section(m: Models, repeats: int, threads: int) -> dict:
    calls, entries = {}, {}
    for name, (fn, args) in jax_parts(m).items():
        compiled, seconds, memory = compile_step(fn, args)
        calls[f"jax_{name}"] = (compiled, args)
        entries[f"jax_{name}"] = {"compile_seconds": seconds, "temp_bytes": memory.get("temp_size_in_bytes")}
    for name, (fn, arg) in torch_parts(m, threads).items():
        calls[f"torch_{name}"] = (_torch_call(fn), (arg,))
        entries[f"torch_{name}"] = {}
    for label, timing in time_round_robin(calls, repeats).items():
        entries[label].update(timing)
    names = [label[4:] for label in calls if label.startswith("jax_")]
    ratios = {n: entries[f"jax_{n}"]["seconds_median"] / entries[f"torch_{n}"]["seconds_median"] for n in names}
    return {"functions": entries, "ratios_jax/torch": ratios}


def flag_probe(root: Path, repeats: int, threads: int) -> dict:
    """In this (child) process: the independent step and its PyTorch twin, round robin."""
    m = build_models(root)
    config = Config(repeats=repeats, schemes=("independent",), remat_schemes=(), batch4=False, xla_flags=())
    report = steps_section(m, config, threads)
    f = report["functions"]
    return {"jax_independent_seconds": f["jax_independent"]["seconds_median"],
            "torch_independent_per_condition_seconds": f["torch_independent_per_condition"]["seconds_median"],
            "ratio_jax/torch_per_condition": report["ratios_jax/torch"]["jax_independent/torch_independent_per_condition"]}


def xla_flags_section(flags: tuple, repeats: int, threads: int) -> dict:
    """:func:`flag_probe` in a child process per ``XLA_FLAGS`` value."""
    results = {}
    for value in flags:
        env = dict(os.environ, XLA_FLAGS=value)
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "probe.json"
            start = time.perf_counter()
            run = subprocess.run([sys.executable, __file__, "--flag-probe", "--out", str(out),
                                  "--repeats", str(repeats)], env=env, capture_output=True, text=True)
            entry = json.loads(out.read_text()) if run.returncode == 0 else {
                "error": run.stderr[-2000:], "returncode": run.returncode}
        entry["child_seconds"] = time.perf_counter() - start
        results[value or "(none)"] = entry
    return {"threads": threads, "variants": results}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON report path (written atomically)")
    parser.add_argument("--quick", action="store_true", help="none + independent only, fewer repeats (smoke run)")
    parser.add_argument("--flag-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    repeats = args.repeats or config.repeats
    threads = xla_threads()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_text_style_") as scratch:
        if args.flag_probe:
            report = flag_probe(Path(scratch), repeats, threads)
        else:
            import torch

            m = build_models(Path(scratch))
            build_seconds = time.perf_counter() - start
            report = {"machine": machine_info(), "mode": "quick" if args.quick else "full",
                      "config": config._asdict(),
                      "threads": {"xla_cpu_intra_op": threads, "torch_intra_op": threads,
                                  "torch_interop": torch.get_num_interop_threads()},
                      "problem": {"unet": "tiny SD UNet 32/64 ch, latents (4, 8, 8)", "vae": "to (16, 16, 3)",
                                  "clip": "ViT 32x32 patch 8, 4 layers", "t": int(m.ctx.t), "step": MID_STEP,
                                  "grid_steps": NUM_STEPS, "sampler": "ddpm_posterior",
                                  "guidance_scale": GUIDANCE_SCALE, "style_layer": STYLE_LAYER,
                                  "conditions": ["style: CLIP Gram energy of decode(x0)",
                                                 "text: CLIP text energy of decode(x0)"],
                                  "rule": f"freedom_rule scales {RULE_SCALES}"},
                      "timing": "median of repeats after a warm-up; functions of a section timed round-robin",
                      "build_seconds": build_seconds}
            sections = [("steps", lambda: steps_section(m, config, threads)),
                        ("parts", lambda: parts_section(m, repeats, threads))]
            if config.batch4:
                sections.append(("batch4", lambda: steps_section(
                    m, config._replace(schemes=("independent",), remat_schemes=("independent",)), threads, 4)))
            if config.xla_flags:
                sections.append(("xla_flags", lambda: xla_flags_section(config.xla_flags, repeats, threads)))
            run_sections(report, sections)
    write_report(args.out, report, start)


if __name__ == "__main__":
    main()
