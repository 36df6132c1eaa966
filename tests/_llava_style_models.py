"""Tiny seeded models and batches of the LLaVA-style codebases, built from configs (no download).

Which codebase a test run sees:
* haotian-liu LLaVA: the ``llava`` package of ``llava-torch==1.2.2.post1`` (tox -e llava);
* LLaVA-VL LLaVA-NeXT: the ``llava`` package of the folder in ``$CALPLUG_LLAVA_NEXT_SRC``
  (tox -e llava-next); it shadows any installed ``llava``;
* MGM: the ``mgm`` package of the folder in ``$CALPLUG_MGM_SRC`` (tox -e mgm).
A tiny CLIP vision tower saved to a temporary folder serves as ``mm_vision_tower`` (the folder
name holds "openai", which MGM's tower builder requires).
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import types

import pytest
import torch

from _skips import is_the_package, missing

IMAGE = -200  # the image placeholder of these codebases (llava.constants.IMAGE_TOKEN_INDEX)
VOCAB = 256
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _src(var: str) -> str | None:
    path = os.environ.get(var)
    if path and path not in sys.path:
        sys.path.insert(0, path)
    return path


def codebase(name: str):
    """The upstream package for ``name`` ("llava", "llava-next", "mgm"). Where it is not there
    (no source folder variable, llava-torch not installed) the test skips naming what to install
    or set, or fails where CALPLUG_REQUIRE names the codebase (tests/_skips.py); where it is
    there but does not import (a broken install, a dependency of it missing), the import error
    is raised as it is. The haotian-liu cases skip plainly where ``llava`` is another codebase
    (LLaVA-NeXT's, which has the same package name)."""
    if name == "mgm":
        if not _src("CALPLUG_MGM_SRC"):
            missing("mgm", "set CALPLUG_MGM_SRC to a checkout of github.com/dvlab-research/MGM (tox -e mgm)")
        return importlib.import_module("mgm.model")
    if name == "llava-next":
        if not _src("CALPLUG_LLAVA_NEXT_SRC"):
            missing("llava-next", "set CALPLUG_LLAVA_NEXT_SRC to a checkout of "
                                  "github.com/LLaVA-VL/LLaVA-NeXT (tox -e llava-next)")
    elif os.environ.get("CALPLUG_LLAVA_NEXT_SRC"):
        pytest.skip("the llava package here is LLaVA-NeXT's ($CALPLUG_LLAVA_NEXT_SRC is set), not "
                    "haotian-liu LLaVA's: tox -e llava runs these cases")
    try:
        module = importlib.import_module("llava.model")
    except ModuleNotFoundError as error:
        if name == "llava" and is_the_package(error, "llava.model"):
            missing("llava", "llava-torch==1.2.2.post1 (haotian-liu LLaVA) is not installed: "
                             "pip install --no-deps llava-torch==1.2.2.post1 (tox -e llava)")
        raise
    from llava.model.llava_arch import LlavaMetaForCausalLM

    is_next = "modalities" in inspect.signature(LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal).parameters
    if is_next != (name == "llava-next"):
        if name == "llava":
            pytest.skip("the installed llava package is LLaVA-NeXT's, not haotian-liu LLaVA's: "
                        "tox -e llava runs these cases")
        raise RuntimeError(f"$CALPLUG_LLAVA_NEXT_SRC is set, but the llava package imported from "
                           f"{module.__file__} is not LLaVA-NeXT's")
    return module


def save_tiny_clip(folder: str) -> str:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(123)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8)
    CLIPVisionModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_tiny_openclip_convnext(clip_folder: str) -> str:
    """A folder MGM's OpenCLIPVisionTower accepts as ``mm_vision_tower_aux``: its name must hold
    "openclip", "convnext", "base" and "w-320" (MGM picks the open_clip model by name), with the
    open_clip config and a checkpoint holding no weights (MGM loads it with strict=False, so the
    ConvNeXt keeps its seeded random init). The tower is ConvNeXt-base (MGM knows no smaller one);
    fed 64-pixel images it costs a fraction of a second."""
    from open_clip.factory import get_model_config

    folder = f"{clip_folder}-openclip-convnext-base-w-320"
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump(get_model_config("convnext_base_w_320"), f)
    torch.save({"unused": torch.zeros(1)}, os.path.join(folder, "open_clip_pytorch_model.bin"))
    torch.save({"unused": torch.zeros(1)}, os.path.join(folder, "no_projector_weights.pt"))
    return folder


TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=0.2)


def build(name: str, clip_folder: str, variant: str = "pad", backbone: str = "llama", seed: int = 0,
          **config_overrides):
    """A tiny seeded model of codebase ``name``; ``variant`` "pad" (1.5), "anyres" (1.6) or, for
    MGM, "aux" (1.5 plus MGM's high-resolution branch: a ConvNeXt tower fed ``images_aux``)."""
    package = codebase(name)
    mm = dict(mm_vision_tower=clip_folder, mm_hidden_size=32, mm_projector_type="mlp2x_gelu",
              mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_aspect_ratio="pad",
              mm_patch_merge_type="flat", tokenizer_padding_side="right", use_mm_proj=True)
    if variant == "anyres":
        mm.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                  image_grid_pinpoints=PINPOINTS)
    # MGM: its vision-tower path must exist and contain "openai" (the fixture's folder name
    # does); without mm_vision_tower_aux it takes the plain LLaVA path (images_aux=None).
    if variant == "aux":
        assert name == "mgm", "only MGM has an auxiliary vision tower"
        # drop_path=False: MGM's default trains the (frozen) ConvNeXt with stochastic depth, so
        # two runs of the same batch would see different features (run-to-run noise, not CAL's).
        mm.update(mm_vision_tower_aux=save_tiny_openclip_convnext(clip_folder), drop_path=False)
    mm.update(config_overrides)
    if name == "mgm":
        llama = importlib.import_module("mgm.model.language_model.mgm_llama")
        config_cls, model_cls = llama.MGMConfig, llama.MGMLlamaForCausalLM
    elif backbone == "qwen2":
        config_cls, model_cls = package.LlavaQwenConfig, package.LlavaQwenForCausalLM
    elif backbone == "mistral":
        config_cls, model_cls = package.LlavaMistralConfig, package.LlavaMistralForCausalLM
    else:
        config_cls, model_cls = package.LlavaConfig, package.LlavaLlamaForCausalLM
    config = config_cls(**TEXT, **mm)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.get_model().get_vision_tower().load_model()
    if variant == "aux":  # what MGM's training script does: load the tower, build the projectors
        tower_aux = model.get_model().get_vision_tower_aux()
        tower_aux.load_model()
        model.config.mm_hidden_size_aux = tower_aux.hidden_size
        adapter = os.path.join(mm["mm_vision_tower_aux"], "no_projector_weights.pt")
        model.get_model().initialize_uni_modules(
            types.SimpleNamespace(pretrain_mm_mlp_adapter=adapter), for_eval=True)
    with torch.no_grad():
        newline = getattr(model.get_model(), "image_newline", None)
        if newline is not None:  # upstream allocates it with torch.empty
            newline.normal_(0.0, 1.0)
    return model.float().train()


def anyres_tiles(image_size_wh) -> int:
    from llava.mm_utils import get_anyres_image_grid_shape

    w, h = get_anyres_image_grid_shape(image_size_wh, PINPOINTS, 32)
    return 1 + w * h


def batch(model, seed: int = 0, samples=((3, 1, 6), (2, 1, 3, 1, 2), (5, 0, 4), (1, 1, 8)),
          padding_side: str = "right", variant: str = "pad", sizes_wh=((30, 60), (60, 30), (64, 64))):
    """``samples``: per sample (prompt tokens, number of images, answer tokens[, images, answer...]).

    Each sample is BOS + prompt, then for every (images, answer) pair that many image
    placeholders followed by the answer (supervised). A sample with 0 images is text-only and,
    as in LLaVA's data loader, still gets a (zero) image in ``images`` that the splice skips.
    """
    gen = torch.Generator().manual_seed(seed)
    rows, labs, n_images = [], [], []
    for spec in samples:
        prompt, rest = spec[0], spec[1:]
        ids = [1] + torch.randint(2, 250, (prompt,), generator=gen).tolist()
        lab = [-100] * len(ids)
        images_here = 0
        for k in range(0, len(rest), 2):
            n_img, answer = rest[k], rest[k + 1]
            ids += [IMAGE] * n_img
            lab += [-100] * n_img
            images_here += n_img
            ans = torch.randint(2, 250, (answer,), generator=gen).tolist()
            ids += ans
            lab += ans
        rows.append(ids)
        labs.append(lab)
        n_images.append(max(images_here, 1))
    L = max(map(len, rows))
    input_ids = torch.zeros(len(rows), L, dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows, labs)):
        sl = slice(L - len(ids), L) if padding_side == "left" else slice(0, len(ids))
        input_ids[b, sl] = torch.tensor(ids)
        labels[b, sl] = torch.tensor(lab)
        mask[b, sl] = 1
    total = sum(n_images)
    out = dict(input_ids=input_ids, attention_mask=mask, labels=labels)
    if variant == "anyres":
        sizes = [sizes_wh[i % len(sizes_wh)] for i in range(total)]
        tiles = [anyres_tiles(s) for s in sizes]
        images = [torch.randn(t, 3, 32, 32, generator=gen) for t in tiles]
        if len(set(tiles)) == 1:
            images = torch.stack(images)
        out.update(images=images, image_sizes=sizes)
    else:
        out.update(images=torch.randn(total, 3, 32, 32, generator=gen))
    if variant == "aux":  # MGM: each image also at high resolution, for the ConvNeXt branch
        out["images_aux"] = torch.randn(total, 3, 64, 64, generator=gen)
    if "modalities" in inspect.signature(model.prepare_inputs_labels_for_multimodal).parameters:
        out["modalities"] = ["image"] * len(rows)  # LLaVA-NeXT: one per sample (its collator's)
    text_only = [b for b, spec in enumerate(samples) if sum(spec[1::2]) == 0]
    for b in text_only:  # the zero image of a text-only sample
        index = sum(n_images[:b])
        if isinstance(out["images"], list):
            out["images"][index] = torch.zeros_like(out["images"][index])
        else:
            out["images"][index] = 0.0
        if "images_aux" in out:
            out["images_aux"][index] = 0.0
    return out


def splice(model, batch: dict):
    """The upstream splice on ``batch``: (position_ids, attention_mask, inputs_embeds, labels)."""
    fn = model.prepare_inputs_labels_for_multimodal
    params = inspect.signature(fn).parameters
    kwargs = dict(input_ids=batch["input_ids"], position_ids=None,
                  attention_mask=batch["attention_mask"], past_key_values=None,
                  labels=batch.get("labels"), images=batch.get("images"))
    for key in ("image_sizes", "images_aux", "modalities"):
        if key in params and key in batch:
            kwargs[key] = batch[key]
    _, pos, mask, _, embeds, labels = fn(**kwargs)
    return pos, mask, embeds, labels


def image_positions(model, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: positions inside the mask whose embedding is no row of the token table.

    Independent of calplug's sentinel: text positions hold an exact row of ``embed_tokens``."""
    table = model.get_model().get_input_embeddings().weight.detach()
    is_token = (embeds.detach().unsqueeze(-2) == table).all(-1).any(-1)
    return mask.bool() & ~is_token
