"""Guided Stable Diffusion steps at the real SD 1.x UNet size: JAX (the library's own Flax UNet)
against diffusers' PyTorch UNet, eager autograd as FreeDoM runs.

    python experiments/bench_sd_unet.py --out experiments/results/bench_sd_unet.json [--quick]

Needs PyTorch and diffusers (the ``parity`` extra, Python 3.11: ``make .venv-oldest`` builds that
environment; run it with ``.venv-oldest/bin/python``). ``--jax-only`` leaves PyTorch out, so the
JAX rows can be re-timed on the newest jax (Python >= 3.12, ``.venv``).

Sizes (section per size):

* ``real``: the SD 1.x UNet (block widths 320/640/1280/1280, 2 layers per block, 8 heads,
  cross-attention to 77 x 768 text states; 860 M parameters), random weights, a 4 x 32 x 32
  latent (a 256 x 256 image), batch 1 with its classifier-free-guidance pair.
* ``tiny``: the tests' UNet (32/64 channels) on a 4 x 8 x 8 latent: overhead-bound.

The weights are written once as a diffusers folder (safetensors) in a temporary directory and
loaded by both frameworks (``load_stable_diffusion``; ``UNet2DConditionModel.from_pretrained``).
Every JAX function takes the UNet weights, the prompt states and the references as arguments.

The guided step, at step 25 of a 50-step DDIM grid (eta 0), CFG w = 7.5, two energies of the
Tweedie estimate ``x0|t`` of the latent (so the UNet is the whole cost):
``E1 = |x0 - a|^2 / 2`` and ``E2 = |tanh(x0) - b|``, ``freedom_rule`` scales (1.0, 0.5).

* ``jax_none`` / ``torch_none``: the unguided DDIM step (one CFG UNet call, no gradient);
* ``jax_independent`` (FreeDoM's sum of per-condition gradients, one backward pass) against
  ``torch_freedom`` (one ``autograd.grad`` of ``rho1 E1 + rho2 E2``) and ``torch_per_condition``
  (one ``autograd.grad`` per energy, the per-condition gradients the JAX schemes also report);
* ``jax_dependent`` (Z-Magic: E2's gradient pulled back through the step guided by E1, a
  vector-Jacobian product through the UNet) and ``jax_multi`` (CAGrad over both);
* ``jax_unet_cfg_forward`` / ``torch_unet_cfg_forward``: the CFG pair alone;
  ``jax_unet_cfg_forward_bf16`` and ``jax_independent_bf16``: bfloat16 compute, float32 params;
* ``gemm``: the float32 and bfloat16 GEMM ceiling of this machine (XLA, 2048^3, and PyTorch),
  against which the UNet forward's achieved GFLOP/s (XLA's flop count of the compiled forward
  divided by its time) is reported.

Times are medians of round-robin rounds after a warm-up (``bench_schemes.time_round_robin``);
compile seconds and compiled temporary memory of every JAX program are reported. PyTorch uses as
many intra-op threads as XLA:CPU.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import zmagic_jax as zm
from bench_schemes import compile_step, machine_info, run_sections, time_round_robin, write_report
from tiny_models import TINY_UNET, save_tiny_stable_diffusion
from zmagic_jax.models import latent_denoiser, load_stable_diffusion
from zmagic_jax.models._unet2d import UNet2DConditionModel
from zmagic_jax.tasks._recipe import sampler_by_name, scheme_by_name

SD1_UNET = dict(_class_name="UNet2DConditionModel", block_out_channels=[320, 640, 1280, 1280],
                layers_per_block=2, sample_size=64, in_channels=4, out_channels=4,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=768,
                attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
                downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
                norm_eps=1e-5)
SIZES = {"real": (SD1_UNET, 32, 77), "tiny": (TINY_UNET, 8, 77)}
NUM_STEPS, MID_STEP = 50, 25
GUIDANCE_SCALE = 7.5
RULE_SCALES = (1.0, 0.5)
SAMPLER = sampler_by_name("ddim")


class Config(NamedTuple):
    repeats: int
    sizes: tuple
    schemes: tuple
    bf16: bool


FULL = Config(repeats=5, sizes=("real", "tiny"), schemes=("none", "independent", "dependent", "multi"), bf16=True)
QUICK = Config(repeats=3, sizes=("tiny",), schemes=("none", "independent", "dependent"), bf16=True)


class Problem(NamedTuple):
    sd: object
    unet_folder: Path
    embeds: np.ndarray     # (2, 77, D): prompt, empty prompt (random states)
    x: np.ndarray          # (4, h, w)
    refs: tuple            # (a, b), each (4, h, w)
    ctx: object            # zm.StepContext of the step
    parameters: int


def build(root: Path, size: str) -> Problem:
    unet, hw, length = SIZES[size]
    saved = save_tiny_stable_diffusion(root / size, unet=unet)
    parameters = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(saved["unet"]))
    del saved
    sd = load_stable_diffusion(root / size)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((2, length, unet["cross_attention_dim"])).astype(np.float32)
    x = rng.standard_normal((4, hw, hw)).astype(np.float32)
    refs = tuple(rng.standard_normal((4, hw, hw)).astype(np.float32) for _ in range(2))
    contexts = zm.step_contexts(sd.schedule, zm.timestep_grid(sd.schedule.num_train_steps, NUM_STEPS))
    ctx = jax.tree_util.tree_map(lambda a: a[MID_STEP], contexts)
    return Problem(sd, root / size / "unet", embeds, x, refs, ctx, parameters)


# ----------------------------------------------------------------------------- JAX

def _quadratic(a, x0):
    return 0.5 * jnp.sum((x0 - a) ** 2)


def _tanh_distance(b, x0):
    return jnp.sqrt(jnp.sum((jnp.tanh(x0) - b) ** 2))


def jax_conditions(p: Problem):
    return (zm.condition("quadratic", _quadratic, zm.freedom_rule(RULE_SCALES[0]), jnp.asarray(p.refs[0])),
            zm.condition("tanh", _tanh_distance, zm.freedom_rule(RULE_SCALES[1]), jnp.asarray(p.refs[1])))


def jax_denoiser(p: Problem, dtype=jnp.float32):
    sd = p.sd if dtype == jnp.float32 else p.sd._replace(unet=UNet2DConditionModel(p.sd.unet.config, dtype=dtype))
    return latent_denoiser(sd, jnp.asarray(p.embeds[0]), jnp.asarray(p.embeds[1]), GUIDANCE_SCALE)


def _step(denoiser, scheme, key, x, ctx):
    return zm.step(key, x, ctx, denoiser=denoiser, scheme=scheme, sampler=SAMPLER)[0]


def _forward(denoiser, x, ctx):
    return denoiser(x, ctx.t)


def jax_calls(p: Problem, config: Config) -> dict:
    """label -> (function, arguments); every weight and reference is an argument."""
    key, x = jax.random.PRNGKey(0), jnp.asarray(p.x)
    conditions = jax_conditions(p)
    calls = {"jax_unet_cfg_forward": (_forward, (jax_denoiser(p), x, p.ctx))}
    for name in config.schemes:
        calls[f"jax_{name}"] = (_step, (jax_denoiser(p), scheme_by_name(name, conditions), key, x, p.ctx))
    if config.bf16:
        bf16 = jax_denoiser(p, jnp.bfloat16)
        calls["jax_unet_cfg_forward_bf16"] = (_forward, (bf16, x, p.ctx))
        calls["jax_independent_bf16"] = (_step, (bf16, scheme_by_name("independent", conditions), key, x, p.ctx))
    return calls


def _flops(compiled):
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


# ----------------------------------------------------------------------------- PyTorch

class TorchStep:
    """The eager DDIM step on ``x`` ``(1, 4, h, w)``: ``mode`` ``"none"``, ``"freedom"`` (one
    ``autograd.grad`` of the weighted sum) or ``"per_condition"`` (one per energy)."""

    def __init__(self, p: Problem, unet, mode: str):
        import torch
        self.torch, self.unet, self.mode = torch, unet, mode
        ab, abn = float(p.ctx.alpha_bar), float(p.ctx.alpha_bar_next)
        self.t, self.ab, self.abn = int(p.ctx.t), ab, abn
        self.rhos = [math.sqrt(ab) * s for s in RULE_SCALES]
        self.context = torch.from_numpy(np.stack([p.embeds[1], p.embeds[0]]))
        self.a, self.b = (torch.from_numpy(r)[None] for r in p.refs)

    def eps(self, x):
        t = self.torch.full((2,), self.t)
        eps_u, eps_c = self.unet(self.torch.cat([x, x]), t, self.context).sample.chunk(2)
        return eps_u + GUIDANCE_SCALE * (eps_c - eps_u)

    def __call__(self, x):
        torch = self.torch
        x = x.detach().requires_grad_(self.mode != "none")
        with torch.set_grad_enabled(self.mode != "none"):
            eps = self.eps(x)
            x0 = (x - math.sqrt(1.0 - self.ab) * eps) / math.sqrt(self.ab)
            energies = (0.5 * ((x0 - self.a) ** 2).sum(), torch.linalg.norm(torch.tanh(x0) - self.b))
            if self.mode == "freedom":
                (grad,) = torch.autograd.grad(sum(r * e for r, e in zip(self.rhos, energies)), x)
            elif self.mode == "per_condition":
                grads = [torch.autograd.grad(e, x, retain_graph=i == 0)[0] for i, e in enumerate(energies)]
                grad = sum(r * g for r, g in zip(self.rhos, grads))
            else:
                grad = torch.zeros_like(x)
        return (math.sqrt(self.abn) * x0 + math.sqrt(1.0 - self.abn) * eps - grad).detach()


def torch_calls(p: Problem, threads: int):
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.set_num_threads(threads)
    unet = TorchUNet.from_pretrained(p.unet_folder).eval().requires_grad_(False)
    x = torch.from_numpy(p.x)[None]
    steps = {mode: TorchStep(p, unet, mode) for mode in ("none", "freedom", "per_condition")}
    forward = steps["none"]
    calls = {"torch_unet_cfg_forward": (lambda x: (torch.no_grad()(forward.eps)(x), None)[1], (x,))}
    calls.update({f"torch_{mode}": (lambda x, s=step: (s(x), None)[1], (x,)) for mode, step in steps.items()})
    return calls, steps, x


# ----------------------------------------------------------------------------- sections

def gemm_section(repeats: int, threads: int, with_torch: bool, n: int = 2048) -> dict:
    """GFLOP/s of an ``n x n`` GEMM in XLA (float32, bfloat16) and PyTorch (float32)."""
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    calls = {f"xla_{name}": (jax.jit(jnp.dot), (jnp.asarray(a, dtype), jnp.asarray(b, dtype)))
             for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))}
    if with_torch:
        import torch
        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        calls["torch_float32"] = (lambda x, y: (torch.mm(x, y), None)[1], (ta, tb))
    timings = time_round_robin(calls, repeats)
    return {"n": n, "gflops_per_second": {k: 2 * n ** 3 / v["seconds_median"] / 1e9 for k, v in timings.items()},
            "functions": timings}


def size_section(root: Path, size: str, config: Config, threads: int, with_torch: bool) -> dict:
    start = time.perf_counter()
    p = build(root, size)
    entries, calls = {}, {}
    for label, (fn, args) in jax_calls(p, config).items():
        compiled, seconds, memory = compile_step(fn, args)
        calls[label] = (compiled, args)
        entries[label] = {"compile_seconds": seconds, "temp_bytes": memory.get("temp_size_in_bytes"),
                          "flops": _flops(compiled)}
        print(f"  {size} {label}: compiled in {seconds:.1f} s", flush=True)
    agreement = {}
    if with_torch:
        tcalls, steps, tx = torch_calls(p, threads)
        calls.update(tcalls)
        entries.update({label: {} for label in tcalls})
    build_seconds = time.perf_counter() - start
    for label, timing in time_round_robin(calls, config.repeats).items():
        entries[label].update(timing)
    seconds = {label: e["seconds_median"] for label, e in entries.items()}
    report = {"unet_parameters": p.parameters, "latent": list(p.x.shape), "t": int(p.ctx.t),
              "build_and_compile_seconds": build_seconds, "functions": entries}
    forward = entries["jax_unet_cfg_forward"]
    report["jax_unet_cfg_forward_gflops_per_second"] = forward["flops"] / forward["seconds_median"] / 1e9
    ratios = {}
    if "jax_dependent" in seconds:
        ratios["jax_dependent/jax_independent"] = seconds["jax_dependent"] / seconds["jax_independent"]
    if "jax_multi" in seconds:
        ratios["jax_multi/jax_independent"] = seconds["jax_multi"] / seconds["jax_independent"]
    if config.bf16:
        ratios["jax_unet_cfg_forward_bf16/jax_unet_cfg_forward"] = (seconds["jax_unet_cfg_forward_bf16"]
                                                                    / seconds["jax_unet_cfg_forward"])
        ratios["jax_independent_bf16/jax_independent"] = seconds["jax_independent_bf16"] / seconds["jax_independent"]
    if with_torch:
        pairs = [("jax_unet_cfg_forward", "torch_unet_cfg_forward"), ("jax_none", "torch_none"),
                 ("jax_independent", "torch_freedom"), ("jax_independent", "torch_per_condition"),
                 ("jax_dependent", "torch_per_condition"), ("jax_multi", "torch_per_condition"),
                 ("jax_unet_cfg_forward_bf16", "torch_unet_cfg_forward"),
                 ("jax_independent_bf16", "torch_freedom")]
        ratios.update({f"{j}/{t}": seconds[j] / seconds[t] for j, t in pairs if j in seconds and t in seconds})
        jax_next = np.asarray(calls["jax_independent"][0](*calls["jax_independent"][1]))
        torch_next = steps["freedom"](tx)[0].numpy()
        agreement = {"max_abs_diff_x_next_independent": float(np.max(np.abs(jax_next - torch_next))),
                     "max_abs_x_next": float(np.max(np.abs(torch_next)))}
    report["ratios"] = ratios
    report["agreement"] = agreement
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON report path (written atomically)")
    parser.add_argument("--quick", action="store_true", help="tiny size only, fewer repeats (smoke run)")
    parser.add_argument("--jax-only", action="store_true", help="leave PyTorch out (e.g. on Python >= 3.12)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help="override the sizes to run")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.sizes:
        config = config._replace(sizes=tuple(args.sizes))
    with_torch = not args.jax_only
    threads = len(os.sched_getaffinity(0))
    start = time.perf_counter()
    report = {"machine": machine_info(), "mode": "quick" if args.quick else "full", "config": config._asdict(),
              "with_torch": with_torch, "threads": threads,
              "problem": {"sampler": "ddim eta 0", "grid_steps": NUM_STEPS, "step": MID_STEP,
                          "guidance_scale": GUIDANCE_SCALE, "rule": f"freedom_rule scales {RULE_SCALES}",
                          "energies": ["|x0 - a|^2 / 2", "|tanh(x0) - b|"]},
              "timing": "median of round-robin rounds after a warm-up"}
    if with_torch:
        import diffusers
        import torch
        report["machine"].update(torch=torch.__version__, diffusers=diffusers.__version__)
    with tempfile.TemporaryDirectory(prefix="bench_sd_unet_") as scratch:
        sections = [("gemm", lambda: gemm_section(config.repeats, threads, with_torch))]
        sections += [(size, lambda size=size: size_section(Path(scratch), size, config, threads, with_torch))
                     for size in config.sizes]
        run_sections(report, sections)
    write_report(args.out, report, start)


if __name__ == "__main__":
    sys.exit(main())
