"""Aspect-ratio buckets: the resolutions an image may train at, and which one each image gets."""

import math

from .subset import FLAG_DEFAULTS, Subset


def bucket_resolutions(resolution, min_reso=None, max_reso=None, steps=None):
    """All (w, h), multiples of `steps` within [min_reso, max_reso], of at most the area of `resolution`,
    the largest height for each width, plus the square bucket; sorted. Unset: the options' defaults."""
    min_reso = FLAG_DEFAULTS["min_bucket_reso"] if min_reso is None else min_reso
    max_reso = FLAG_DEFAULTS["max_bucket_reso"] if max_reso is None else max_reso
    steps = FLAG_DEFAULTS["bucket_reso_steps"] if steps is None else steps
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area)) // steps * steps
    buckets = {(side, side)}
    for width in range(min_reso - min_reso % steps or steps, max_reso + 1, steps):
        if width < min_reso:
            continue
        height = min(max_reso, max_area // width // steps * steps)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def select_bucket(image_size, subset: Subset):
    """The (w, h) an image of `image_size` trains at under the subset's bucket settings."""
    width, height = image_size
    if not subset.enable_bucket:
        return subset.resolution
    if subset.bucket_no_upscale:
        # the image's own aspect ratio, shrunk to the training area if larger, rounded down to steps
        steps = subset.bucket_reso_steps
        scale = min(1.0, math.sqrt(subset.resolution[0] * subset.resolution[1] / (width * height)))
        return (max(steps, int(width * scale) // steps * steps), max(steps, int(height * scale) // steps * steps))
    candidates = _buckets_for(subset.resolution, subset.min_bucket_reso, subset.max_bucket_reso,
                              subset.bucket_reso_steps)
    log_ratio = math.log(width / height)
    # nearest aspect ratio on a log scale (so 2:1 and 1:2 are equally far from 1:1); ties -> larger area
    return min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ratio), -b[0] * b[1]))


_BUCKET_LISTS = {}


def _buckets_for(resolution, min_reso, max_reso, steps):
    key = (tuple(resolution), min_reso, max_reso, steps)
    if key not in _BUCKET_LISTS:
        _BUCKET_LISTS[key] = bucket_resolutions(resolution, min_reso, max_reso, steps)
    return _BUCKET_LISTS[key]


def cover_size(image_size, bucket):
    """The size to resize to so that the image covers the bucket, keeping its aspect ratio."""
    scale = max(bucket[0] / image_size[0], bucket[1] / image_size[1])
    return (max(bucket[0], round(image_size[0] * scale)), max(bucket[1], round(image_size[1] * scale)))
