"""Which method runs on which model family: the README's "Other model libraries" table, from the code itself.

For every family (a small model with random weights, built from its library's own classes) and every method, patch
with a real reduction (``r=2``; ``keep=0.7`` for idle), run a forward and check the token count fell (idle: the
blocks computed fewer tokens); a refusal is reported with the first sentence of its message.

    python benchmarks/family_matrix.py
"""
from __future__ import annotations

import argparse

import timm
import torch

import leanvit
from leanvit.reduce import METHODS

from common import parse_args, table, write


def families() -> dict[str, tuple[str, callable]]:
    """name -> (library, builder) of small models (16-64 image tokens, 2 blocks)."""
    from transformers import (CLIPVisionConfig, CLIPVisionModel, DeiTConfig, DeiTForImageClassificationWithTeacher,
                              Dinov2Config, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, Dinov2Model,
                              SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTForImageClassification)
    import open_clip.transformer as oc

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
    return {
        "timm ViT / DeiT (cls, dist, registers)": ("timm", lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, reg_tokens=2)),
        "timm ViT, global average pool": ("timm", lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
            class_token=False, global_pool="avg")),
        "timm Eva / EVA-02 (RoPE)": ("timm", lambda: timm.create_model(
            "eva02_tiny_patch14_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
            ref_feat_shape=(4, 4))),
        "timm features_only wrapper": ("timm", lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
            features_only=True, out_indices=(1,))),
        "HF ViTForImageClassification": ("transformers", lambda: ViTForImageClassification(ViTConfig(**small))),
        "HF DeiTForImageClassificationWithTeacher": ("transformers", lambda: DeiTForImageClassificationWithTeacher(
            DeiTConfig(**small))),
        "HF CLIPVisionModel": ("transformers", lambda: CLIPVisionModel(CLIPVisionConfig(**small))),
        "HF SiglipVisionModel (no cls token)": ("transformers", lambda: SiglipVisionModel(SiglipVisionConfig(
            **small))),
        "HF Dinov2Model": ("transformers", lambda: Dinov2Model(Dinov2Config(**small))),
        "HF Dinov2WithRegistersModel": ("transformers", lambda: Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(**small, num_register_tokens=2))),
        "open_clip VisionTransformer": ("open_clip", lambda: oc.VisionTransformer(
            image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)),
        "open_clip VisionTransformer, attentional pool": ("open_clip", lambda: oc.VisionTransformer(
            image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16,
            attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)),
    }


def outcome(build, method: str) -> str:
    torch.manual_seed(0)
    model = build().eval()
    amount = {"keep": 0.7} if method == "idle" else {"r": 2}
    try:
        leanvit.patch(model, method, **amount)
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    except leanvit.LeanvitError as e:
        return "refused: " + str(e).split(": ", 1)[-1].split(". ")[0].rstrip(".")
    red = leanvit.get_reducer(model)
    return "yes" if red.reducing else "no reduction"


def main() -> None:
    parse_args(argparse.ArgumentParser(description=__doc__))
    methods = [m for m in METHODS if m != "truncate"]
    rows, notes = [], []
    for name, (library, build) in families().items():
        cells = []
        for m in methods:
            out = outcome(build, m)
            if out.startswith("refused"):
                notes.append(f"* {name}, `{m}`: {out}.")
                out = "refused"
            cells.append(out)
        rows.append([name, library, *cells])
    md = ["`r=2` (`keep=0.7` for idle) on small models with random weights; *yes*: patched and ran with fewer "
          "tokens computed.\n", *table(["family", "library", *methods], rows), "", *notes]
    write("family_matrix", {"rows": rows, "notes": notes}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
