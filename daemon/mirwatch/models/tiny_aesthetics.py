"""An Audiobox Aesthetics checkpoint of the real architecture, with random weights.

`AesMultiOutput` has a fixed WavLM-base encoder (94 M parameters): its
constructor offers no smaller size. The file is therefore full-size in shape
but small on disk: every tensor of the state dict is a view into one seeded
random pool, and ``torch.save`` stores a storage shared by views once (about
10 MB instead of 380 MB). Loading copies each view into its own parameter,
so the analyzer loads it with exactly the code and the file layout it uses
for the published ``checkpoint.pt`` (``state_dict`` with a ``model.``
prefix, ``model_cfg``, ``target_transform``). Its scores are meaningless.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = "aesthetics/checkpoint.pt"
AXES = ("CE", "CU", "PC", "PQ")
# The constructor arguments the published checkpoint records in ``model_cfg``, at their defaults.
MODEL_CFG = {
    "proj_num_layer": 1,
    "proj_ln": False,
    "proj_act_fn": "gelu",
    "proj_dropout": 0.0,
    "nth_layer": 13,
    "use_weighted_layer_sum": True,
    "precision": "32",
    "normalize_embed": True,
    "output_dim": 1,
}


def write(root: Path, *, seed: int = 0) -> list[str]:
    import torch
    from audiobox_aesthetics.model.aes import AesMultiOutput

    generator = torch.Generator().manual_seed(seed)
    target_transform = {
        axis: {"mean": float(4 + 3 * torch.rand((), generator=generator)),
               "std": float(1 + torch.rand((), generator=generator))}
        for axis in AXES
    }
    # Only the shapes are kept (its own initialisation cannot run on the meta device).
    shapes = {name: t.shape for name, t in AesMultiOutput(**MODEL_CFG).state_dict().items()}
    largest = max(s.numel() for s in shapes.values())
    # float16 halves the file; loading casts into the float32 parameters.
    pool = (0.05 * torch.randn(largest + 4096, generator=generator)).to(torch.float16)
    state_dict = {}
    for index, (name, shape) in enumerate(sorted(shapes.items())):
        # Different offsets, so that layers do not all hold the same numbers.
        offset = (index * 97) % 4096
        state_dict["model." + name] = pool[offset : offset + shape.numel()].view(shape)
    path = Path(root) / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": state_dict, "model_cfg": dict(MODEL_CFG), "target_transform": target_transform},
        path,
    )
    return [CHECKPOINT]
