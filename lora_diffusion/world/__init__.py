"""The shapes world of builtin:mini: seeded scenes, captions and a judge that reads them back (scenes.py), its
feature network for FID/KID (features.py), quality figures from generated images (quality.py), and the pretraining
of builtin:mini itself (pretrain_mini.py). `from lora_diffusion import world; world.judge(image)`."""

from .scenes import (  # noqa: F401
    CAPTION_STYLES,
    CENTER_JITTER,
    COLORS,
    FLAT,
    HELD_OUT_PAIRS,
    MAX_ROTATION,
    PALETTE,
    PEAK_SWING,
    PRETRAIN_SHAPES,
    PROFILE_BINS,
    SHAPES,
    SIZE_RANGE,
    STAR_INNER_RATIO,
    Scene,
    caption,
    classify_mask,
    color_pairs,
    count_rises,
    judge,
    judge_accuracy,
    outline,
    parse_caption,
    radial_profile,
    render,
    sample_scene,
    shape_mask,
    write_images,
)
