"""The canvas-digits model folders written by experiments/train_canvas_digits.py: every file
checked, both models load through the users' Stable Diffusion loader as pixel-space folders (the
layout model with its conditioning channel), and a damaged file is named. Random weights of the
real architectures, written by the training script's own writer."""
import shutil

import numpy as np
import pytest

from experiments.train_canvas_digits import MAX_TOKENS, WORDS, write_assets
from zmagic_jax.ports import AssetChecksumError, load_canvas_models
from zmagic_jax.ports import _canvas


@pytest.fixture(scope="module")
def assets(canvas_assets):
    return canvas_assets


def test_written_folders_load_as_pixel_space_models(assets):
    models = load_canvas_models(assets)
    for sd, extra in ((models.text, 0), (models.layout, 1)):
        assert sd.vae is None and sd.latent_channels == 1 and sd.extra_channels == extra and sd.sample_size == 32
        assert sd.prediction_type == "epsilon" and sd.schedule.num_train_steps == 1000
    for word in list(WORDS) + list("0123456789"):  # every word of the prompts is one token
        ids = models.text.tokenizer([word], MAX_TOKENS)[0]
        assert ids[2] == models.text.tokenizer.eos_token_id != ids[1], (word, ids)
    logits = models.evaluator.module.apply({"params": models.evaluator.params}, np.zeros((2, 32, 32, 1))).logits
    assert logits.shape == (2, 10)


def test_a_damaged_file_is_named(assets, tmp_path):
    copy = tmp_path / "canvas"
    shutil.copytree(assets, copy)
    path = copy / "layout" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AssetChecksumError, match=r"canvas assets: .*layout/unet/diffusion_pytorch_model\.safetensors "
                                                 r"is damaged.*train_canvas_digits\.py"):
        load_canvas_models(copy)
    (copy / "checksums.json").unlink()
    with pytest.raises(AssetChecksumError, match=r"checksums\.json is missing"):
        load_canvas_models(copy)


def test_without_shipped_assets_the_default_says_how_to_make_them(monkeypatch, tmp_path):
    monkeypatch.setattr(_canvas, "CANVAS_ASSETS", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"does not ship the canvas models yet.*train_canvas_digits\.py"):
        load_canvas_models()


def test_the_writer_leaves_a_folder_it_did_not_write_alone(assets, tmp_path):
    theirs = tmp_path / "theirs"
    (theirs / "text").mkdir(parents=True)
    (theirs / "text" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a folder this script wrote"):
        write_assets(theirs, {"text": assets / "text"}, assets / "evaluator.safetensors", {}, {}, seed=0)
    assert (theirs / "text" / "notes.txt").read_text() == "mine"
    # its own earlier output is replaced
    ours = tmp_path / "ours"
    shutil.copytree(assets, ours)
    write_assets(ours, {"text": assets.parent / "work" / "text"}, assets.parent / "work" / "evaluator.safetensors",
                 {}, {}, seed=0)
    assert load_canvas_models(ours).text.latent_channels == 1
