"""The training data: kohya's folder layout, captions, aspect-ratio buckets and a latent cache.

    train_data_dir/                  <- the PARENT of concept folders
        10_sks dog/                  <- <repeats>_<class tokens>
            img1.png   img1.txt      <- image + caption (<stem><caption_extension>)
    reg_data_dir/                    <- same layout, regularization (prior-preservation) images
        1_dog/ ...

LoRADataset(train_data_dir, reg_data_dir, **kohya_flag_names) or LoRADataset.from_config("dataset.toml");
with in_json=..., train_data_dir holds the images of kohya's fine-tuning metadata JSON.
ds[i] -> {"image" (3,H,W) in [-1,1] | "latents" (4,h,w), "alpha_mask" (H,W) in [0,1] or None, "caption",
"is_reg", "bucket" (w,h), "path", "flipped", "original_size" (w,h) of the image as displayed, "crop" (left, top)
of the bucket's window in the resized (and flipped) image}: the last two are SDXL's size and crop conditioning.
BucketBatchSampler draws every batch from one bucket; collate_fn stacks a batch.
Every random choice (caption shuffle/dropout/wildcards, flip, crop, colour) is a function of (seed, epoch, sample
index); the loop tells the dataset its epoch (set_epoch), and for token_warmup_step its step (set_current_step,
set_max_train_steps).

This file puts together the pieces in lora_diffusion/data/: errors, subset (one folder's settings), buckets,
images, captions, layout (concept folders, repeats, masks), metadata (kohya's fine-tuning JSON), dataset_config
(kohya's dataset config), latents and debug (debug_dataset).
"""

import math
import multiprocessing
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from . import files as image_files
from .buckets import bucket_resolutions, select_bucket
from .captions import caption_varies, process_caption
from .dataset_config import read_dataset_config
from .debug import debug_dataset
from .errors import DatasetError, DatasetWarning, warn
from .images import center_crop, face_crop_box, load_example, load_image
from .latents import (
    encode_latents,
    latent_cache_key,
    latent_file_path,
    latent_shape,
    read_latent_file,
    vae_fingerprint,
    write_latent_file,
)
from .layout import assign_repeats, caption_file, concept_subsets, mask_folders, scan_subset
from .metadata import metadata_subset, scan_metadata
from .subset import FLAG_DEFAULTS, PARENT_FLAGS, SUBSET_KEYS, Subset, check_subset

__all__ = ["LoRADataset", "BucketBatchSampler", "collate_fn", "DatasetError", "DatasetWarning",
           "Subset", "bucket_resolutions", "select_bucket", "load_image", "process_caption", "debug_dataset"]

# the image extensions scanned for (one definition, shared with lora_diffusion.tools)
IMAGE_EXTENSIONS = image_files.IMAGE_EXTENSIONS


# ----------------------------------------------------------------------------------------------
# The dataset

class LoRADataset(torch.utils.data.Dataset):
    def __init__(self, train_data_dir, reg_data_dir=None, *, seed=0, **options):
        """`options`: the dataset options by their flag names (caption_extension, resolution, enable_bucket, ...:
        FLAG_DEFAULTS, declared once as the fields of lora_diffusion.data.subset.Subset); unset ones default."""
        unknown = sorted(set(options) - set(FLAG_DEFAULTS))
        if unknown:
            raise TypeError(f"LoRADataset() got an unexpected keyword argument {unknown[0]!r}")
        options = {**FLAG_DEFAULTS, **options}
        check_subset(Subset(Path("."), **options), "dataset options")  # bad flags fail before any scanning
        if options["in_json"]:
            subsets = [metadata_subset(train_data_dir, reg_data_dir, options)]
        else:
            folder_options = {**options, **dict.fromkeys(PARENT_FLAGS)}  # each subset gets its own folder below
            subsets = concept_subsets(train_data_dir, "train_data_dir", False, folder_options)
            if options["conditioning_data_dir"] is not None:
                subsets = mask_folders(subsets, options["conditioning_data_dir"])
            if reg_data_dir is not None:  # regularization images have no masks: all of each is learned
                subsets += concept_subsets(reg_data_dir, "reg_data_dir", True, folder_options)
        self._setup(subsets, seed, sources=[f"train_data_dir '{train_data_dir}'"] +
                    ([f"reg_data_dir '{reg_data_dir}'"] if reg_data_dir is not None else []))

    @classmethod
    def from_config(cls, toml_path, **defaults):
        """A dataset from kohya's dataset config file (TOML or JSON). `defaults` are the flag values
        (LoRADataset keyword names); values in the file win. train_data_dir/reg_data_dir are ignored."""
        path = Path(toml_path).expanduser()
        ignored = [k for k in ("train_data_dir", "reg_data_dir", "in_json", *PARENT_FLAGS)
                   if defaults.pop(k, None) is not None]
        if ignored:
            warn(f"{' and '.join(ignored)} ignored: the dataset config '{path}' lists the image folders (and each "
                 f"subset's mask folder as its conditioning_data_dir)")
        seed = defaults.pop("seed", 0)
        unknown = sorted(set(defaults) - set(FLAG_DEFAULTS))
        if unknown:
            raise DatasetError(f"LoRADataset.from_config: unknown option(s) {', '.join(unknown)}; expected "
                               f"LoRADataset keyword names ({', '.join(FLAG_DEFAULTS)}, seed)")
        subsets, batch_size = read_dataset_config(path, {**FLAG_DEFAULTS, **defaults})
        dataset = cls.__new__(cls)
        dataset._setup(subsets, seed, sources=[f"dataset config '{path}'"])
        dataset.batch_size = batch_size
        return dataset

    # -- building -------------------------------------------------------------------------------

    def _setup(self, subsets, seed, sources):
        if not isinstance(seed, int):
            raise DatasetError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.batch_size = None  # a batch_size from a dataset config file, for the trainer to use
        self.subsets = [check_subset(s, f"folder '{s.image_dir}'") for s in subsets]
        self.entries = []
        for index, subset in enumerate(self.subsets):
            found = scan_metadata(subset, index) if subset.metadata_file is not None else scan_subset(subset, index)
            if not found:
                warn(f"no images in '{subset.image_dir}'; the folder is skipped")
            self.entries.extend(found)
        if not any(not self.subsets[e.subset].is_reg for e in self.entries):
            folders = ", ".join(f"'{s.image_dir}'" for s in self.subsets if not s.is_reg)
            raise DatasetError(f"no training images found in {' and '.join(sources)}: looked for files ending in "
                               f"{', '.join(sorted({'.png', '.jpg', '.jpeg', '.webp', '.bmp'}))} (or any other "
                               f"format Pillow reads) directly inside {folders or 'no folder'}")
        self.validation_entries = []
        self._index()

    def _index(self):
        """What follows from the entries: repeats, the sample list, buckets, counts, tag frequencies."""
        assign_repeats(self.entries, self.subsets)
        self.sample_entry = np.repeat(np.arange(len(self.entries)), [e.repeats for e in self.entries])
        self.sample_buckets = [self.entries[i].bucket for i in self.sample_entry]
        # the loop's position, shared with DataLoader workers: epoch, optimizer steps done, steps of the run
        for name in self._SHARED:
            setattr(self, name, multiprocessing.Value("q", 0, lock=False))
        self._latents = None  # entry index -> (latents, flipped latents or None) once cached
        self._replacement = {}  # entry index of an image that failed to decode -> the entry served instead
        self._latent_store = {}  # cache key -> (latents, flipped), survives a re-cache with other settings

        images_in = Counter(e.subset for e in self.entries)  # subset index -> images found
        self.num_train_images = sum(s.num_repeats * images_in[i] for i, s in enumerate(self.subsets) if not s.is_reg)
        self.num_reg_images = sum(s.num_repeats * images_in[i] for i, s in enumerate(self.subsets) if s.is_reg)
        self.dataset_dirs = {_name(s): {"n_repeats": s.num_repeats, "img_count": images_in[i]}
                             for i, s in enumerate(self.subsets)}
        self.tag_frequency = {_name(s): {} for s in self.subsets}
        for entry in self.entries:
            frequency = self.tag_frequency[_name(self.subsets[entry.subset])]
            for tag in entry.caption.replace("\n", ",").split(","):  # enable_wildcard keeps every line
                tag = tag.strip().lower()
                if tag:
                    frequency[tag] = frequency.get(tag, 0) + 1
        self.bucket_counts = dict(sorted(Counter(self.sample_buckets).items()))
        self.buckets = list(self.bucket_counts)

    def split_validation(self, share: float, seed: int | None = None) -> list:
        """Hold out `share` of the training images (not regularization images), chosen by `seed`, for a validation
        loss: they leave the training samples. Returns the held-out entries (at least one, and at least one image
        stays for training)."""
        if not 0 < share < 1:
            raise DatasetError(f"--validation_split {share}: expected a share between 0 and 1, e.g. 0.1")
        if self._latents is not None:
            raise DatasetError("split_validation must come before cache_latents")
        candidates = [i for i, e in enumerate(self.entries) if not self.subsets[e.subset].is_reg]
        count = max(1, round(share * len(candidates)))
        if count >= len(candidates):
            raise DatasetError(f"--validation_split {share} would hold out all {len(candidates)} training images; "
                               f"use a smaller share or --validation_data_dir")
        chosen = set(random.Random(f"{self.seed if seed is None else seed}/validation").sample(candidates, count))
        self.validation_entries += [self.entries[i] for i in sorted(chosen)]
        self.entries = [e for i, e in enumerate(self.entries) if i not in chosen]
        self._index()
        return self.validation_entries

    _SHARED = ("_epoch", "_step", "_max_steps")

    def __getstate__(self):
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            # a plain pickle or deepcopy (not a DataLoader worker being started): keep the values only
            for name in self._SHARED:
                state[name] = int(getattr(self, name).value)
        return state

    def __setstate__(self, state):
        for name in self._SHARED:
            if isinstance(state.get(name, 0), int):
                state[name] = multiprocessing.Value("q", state.get(name, 0), lock=False)
        self.__dict__.update(state)

    # -- epochs and items -----------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int):
        """The epoch, counted from 0 (BucketBatchSampler.set_epoch calls it)."""
        self._epoch.value = int(epoch)

    set_current_epoch = set_epoch  # kohya's name

    @property
    def step(self) -> int:
        return self._step.value

    def set_current_step(self, step: int):
        """The optimizer steps done so far (kohya's current_step), for token_warmup_step."""
        self._step.value = int(step)

    def set_max_train_steps(self, max_train_steps: int):
        """The run's steps: a token_warmup_step below 1 is a share of them."""
        self._max_steps.value = int(max_train_steps)

    @property
    def has_masks(self) -> bool:
        """Items carry a loss mask ("alpha_mask"; collate_fn's "alpha_masks"): alpha_mask or conditioning_data_dir
        is set for some folder."""
        return any(s.alpha_mask or s.conditioning_data_dir is not None for s in self.subsets)

    @property
    def num_reg_samples(self) -> int:
        return int(sum(e.repeats for e in self.entries if self.subsets[e.subset].is_reg))

    @property
    def resolution(self) -> tuple[int, int]:
        """(width, height) the dataset trains at: the resolution option, or what a dataset config set."""
        width, height = self.subsets[0].resolution
        return int(width), int(height)

    def captions_are_fixed(self) -> bool:
        """Every image always gives one caption: no caption option is random or follows the epoch or step, in any
        folder (a dataset config sets them per subset)."""
        return not any(caption_varies(self.subsets[e.subset], e.caption) for e in self.entries)

    def fixed_captions(self) -> set[str]:
        """Every caption the dataset can give when no caption option is random."""
        return {self.fixed_caption_of(e) for e in self.entries}

    def fixed_caption_of(self, entry) -> str:
        """The caption an entry always gives when no caption option is random."""
        return process_caption(entry.caption, self.subsets[entry.subset], random.Random(0))

    def __len__(self):
        return len(self.sample_entry)

    def _rng(self, index, purpose):
        return random.Random(f"{self.seed}/{self.epoch}/{index}/{purpose}")

    def caption_of(self, entry, rng) -> str:
        """The entry's caption for one sample at the dataset's current epoch and step."""
        return process_caption(entry.caption, self.subsets[entry.subset], rng, epoch=self.epoch, step=self.step,
                               max_train_steps=self._max_steps.value)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for a dataset of {len(self)} samples")
        index = index % len(self)
        entry_index = int(self.sample_entry[index])
        subset = self.subsets[self.entries[entry_index].subset]
        flip = subset.flip_aug and self._rng(index, "flip").random() < 0.5
        image, latents, mask = None, None, None
        if self._latents is not None:
            entry_index = self._replacement.get(entry_index, entry_index)  # an image that failed to decode
            plain, flipped, mask = self._latents[entry_index]
            latents = flipped if flip and flipped is not None else plain
            if mask is not None:
                mask = mask.float() / 255  # kept as bytes: a pixel-size float mask is 16x its latents
                if latents is flipped:
                    mask = mask.flip(-1)  # a centred window: the mirrored image's mask is the mirrored mask
            # cached latents are center crops: the crop follows from the size and bucket (both in the cache key)
            entry = self.entries[entry_index]
            crop = center_crop(entry.size, entry.bucket, flip=latents is flipped)
        else:
            (image, crop, mask), entry_index = self._load_with_fallback(entry_index, index, flip)
        entry = self.entries[entry_index]
        subset = self.subsets[entry.subset]
        return {"image": image, "latents": latents, "alpha_mask": mask, "flipped": bool(flip if latents is None
                                                                                         else latents is flipped),
                "caption": self.caption_of(entry, self._rng(index, "caption")),
                "is_reg": subset.is_reg, "bucket": entry.bucket, "path": str(entry.path),
                "original_size": tuple(entry.size), "crop": tuple(crop)}

    def _mask_source(self, entry):
        subset = self.subsets[entry.subset]
        return entry.mask if entry.mask is not None else "alpha" if subset.alpha_mask else None

    def _load(self, entry_index, index, flip):
        """One sample's image, crop and mask, with the entry's subset's crop, colour and resize settings."""
        entry = self.entries[entry_index]
        subset = self.subsets[entry.subset]
        crop_box = None
        if entry.face is not None and not subset.enable_bucket:
            crop_box = face_crop_box(entry.size, entry.face, entry.bucket, subset.face_crop_aug_range,
                                     self._rng(index, "face"), subset.random_crop)
        crop_rng = self._rng(index, "crop") if subset.random_crop and crop_box is None else None
        color_rng = self._rng(index, "color") if subset.color_aug else None
        return load_example(entry.path, entry.bucket, crop_rng=crop_rng, flip=flip,
                            interpolation=subset.resize_interpolation, color_rng=color_rng,
                            mask=self._mask_source(entry), crop_box=crop_box)

    def _load_with_fallback(self, entry_index, index, flip):
        """A file that fails to decode mid-training is replaced by the next image of the same bucket
        (with its own caption), with a warning naming it, instead of killing a long run."""
        bucket = self.entries[entry_index].bucket
        try:
            return self._load(entry_index, index, flip), entry_index
        except DatasetError:
            raise  # a bad mask or option, not a bad file
        except Exception as e:
            failures = [f"{self.entries[entry_index].path}: {type(e).__name__}: {e}"]
            warn(f"could not decode image '{self.entries[entry_index].path}' ({type(e).__name__}: {e}); "
                  f"using another image of bucket {bucket[0]}x{bucket[1]} instead")
        same_bucket = [i for i, e in enumerate(self.entries) if e.bucket == bucket]
        start = same_bucket.index(entry_index)
        for candidate in same_bucket[start + 1:] + same_bucket[:start]:
            try:
                return self._load(candidate, index, flip), candidate
            except DatasetError:
                raise
            except Exception as e:
                failures.append(f"{self.entries[candidate].path}: {type(e).__name__}: {e}")
                warn(f"could not decode image '{self.entries[candidate].path}' ({type(e).__name__}: {e}); "
                      f"using another image of bucket {bucket[0]}x{bucket[1]} instead")
        raise DatasetError("no image of bucket %dx%d can be decoded:\n  %s" % (*bucket, "\n  ".join(failures)))

    # -- latent cache ---------------------------------------------------------------------------

    def cache_latents(self, vae, *, to_disk=False, batch_size=1, device="cpu", dtype=torch.float32, vae_id=None,
                      cache_dir=None):
        """Encode every image once; items then carry "latents" instead of "image".

        Latents are vae.encode(x).latent_dist.mode() (the posterior mean: deterministic, so a disk cache
        is exactly reproducible; kohya draws .sample()) times vae.config.scaling_factor. With flip_aug the
        flipped image is encoded too. With `to_disk`, each image gets '<stem>_<key>.safetensors' next to
        it (or in `cache_dir`), where the key hashes the image bytes, bucket, resize and crop, the VAE
        (`vae_id`, else a fingerprint of its config and weights) and `dtype`: a changed input never
        reuses a stale file, and the same input hits the cache in every run. A cache file of the wrong shape or
        with NaN/inf is named in a warning and encoded again. An image that fails to decode is skipped with a
        warning and replaced by the next image of its bucket, as without the cache."""
        if self.uncacheable_options:
            option = self.uncacheable_options[0]
            raise DatasetError(f"{option} cannot be combined with cached latents ({_UNCACHEABLE[option]}), as in "
                               f"kohya: turn off {option} or the latent cache (--no_cache_latents)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DatasetError(f"vae_batch_size must be an integer >= 1, got {batch_size!r}")
        vae_key = str(vae_id) if vae_id is not None else vae_fingerprint(vae)
        keys = [latent_cache_key(entry, vae_key, dtype, interpolation=self.subsets[entry.subset].resize_interpolation,
                                 mask=self._mask_source(entry)) for entry in self.entries]
        results, todo, broken = {}, defaultdict(list), {}
        for i, (entry, key) in enumerate(zip(self.entries, keys)):
            need_flip = self.subsets[entry.subset].flip_aug
            need_mask = self._mask_source(entry) is not None
            found = self._latent_store.get(key)
            if found is None and to_disk:
                found = read_latent_file(latent_file_path(entry, key, cache_dir), key, latent_shape(vae, entry.bucket),
                                         mask_shape=(entry.bucket[1], entry.bucket[0]))
            if found is not None and (found[1] is not None or not need_flip) and (found[2] is not None or
                                                                                   not need_mask):
                results[i] = found
            else:
                todo[entry.bucket].append(i)
        for bucket, indices in todo.items():
            jobs = [(i, False) for i in indices] + [(i, True) for i in indices
                                                     if self.subsets[self.entries[i].subset].flip_aug]
            encoded, masks = {}, {}
            for start in range(0, len(jobs), batch_size):
                chunk, images = [], []
                for i, flip in jobs[start:start + batch_size]:
                    if i in broken:
                        continue
                    subset = self.subsets[self.entries[i].subset]
                    try:
                        image, _, mask = load_example(self.entries[i].path, bucket, flip=flip,
                                                      interpolation=subset.resize_interpolation,
                                                      mask=None if flip else self._mask_source(self.entries[i]))
                        images.append(image)
                        chunk.append((i, flip))
                        if mask is not None:
                            masks[i] = (mask * 255).round().to(torch.uint8)
                    except DatasetError:
                        raise
                    except Exception as e:  # as without the cache: skipped with a warning, not the end of the run
                        broken[i] = f"{self.entries[i].path}: {type(e).__name__}: {e}"
                        warn(f"could not decode image '{self.entries[i].path}' ({type(e).__name__}: {e}); "
                             f"using another image of bucket {bucket[0]}x{bucket[1]} instead")
                if not chunk:
                    continue
                latents = encode_latents(vae, torch.stack(images), device=device, dtype=dtype).cpu()
                for (i, flip), z in zip(chunk, latents):
                    if not torch.isfinite(z).all():
                        raise DatasetError(f"the VAE encoded image '{self.entries[i].path}' to NaN or infinite "
                                           f"latents (an fp16 VAE overflowing?): encode in fp32 or bf16")
                    encoded[(i, flip)] = z.clone()  # not a view: keeps one latent, not the whole batch, alive
            for i in indices:
                if i in broken:
                    continue
                results[i] = (encoded[(i, False)], encoded.get((i, True)), masks.get(i))
                if to_disk:
                    write_latent_file(latent_file_path(self.entries[i], keys[i], cache_dir), keys[i], *results[i])
        for i, key in enumerate(keys):
            if i not in broken:
                self._latent_store[key] = results[i]
        self._replacement = {i: self._replacement_for(i, broken) for i in broken}
        self._latents = [results.get(i) for i in range(len(self.entries))]

    def _replacement_for(self, entry_index, broken):
        """The next decodable image of the same bucket: what a broken image is replaced by, as without the cache."""
        bucket = self.entries[entry_index].bucket
        same_bucket = [i for i, e in enumerate(self.entries) if e.bucket == bucket]
        start = same_bucket.index(entry_index)
        for candidate in same_bucket[start + 1:] + same_bucket[:start]:
            if candidate not in broken:
                return candidate
        failures = [broken[i] for i in same_bucket]
        raise DatasetError("no image of bucket %dx%d can be decoded:\n  %s" % (*bucket, "\n  ".join(failures)))

    @property
    def uncacheable_options(self) -> list[str]:
        """The options, set in some folder (by a flag or a dataset config), that rule out cache_latents."""
        return [option for option in _UNCACHEABLE if any(getattr(s, option) for s in self.subsets)]

    def clear_latent_cache(self):
        """Serve images again (the in-memory store and disk files are kept)."""
        self._latents = None

    @property
    def latents_cached(self) -> bool:
        return self._latents is not None

    # -- summary --------------------------------------------------------------------------------

    def summary(self) -> str:
        n_train = len(self) - self.num_reg_samples
        lines = [f"LoRADataset: {len(self)} samples per epoch ({n_train} training + {self.num_reg_samples} "
                 f"regularization), {len(self.entries)} images in {len(self.subsets)} folders"]
        for is_reg in (False, True):
            chosen = [(i, s) for i, s in enumerate(self.subsets) if s.is_reg == is_reg]
            if not chosen:
                continue
            lines.append("regularization folders:" if is_reg else "training folders:")
            for index, subset in chosen:
                mine = [e for e in self.entries if e.subset == index]
                samples = sum(e.repeats for e in mine)
                if subset.metadata_file is not None:
                    captions = f"captions from metadata '{subset.metadata_file}'"
                else:
                    with_caption = sum(1 for e in mine if caption_file(e.path, subset.caption_extension).is_file())
                    captions = (f"{with_caption} '{subset.caption_extension}' captions, class tokens "
                                f"{subset.class_tokens!r}")
                masks = ("; alpha masks" if subset.alpha_mask else
                         f"; masks from '{subset.conditioning_data_dir}'" if subset.conditioning_data_dir else "")
                lines.append(f"  {str(subset.image_dir)!s:<40} {len(mine):>5} images x {subset.num_repeats:>3} "
                             f"repeats -> {samples:>6} samples; {captions}{masks}")
        first = self.subsets[0]
        mode = ("off" if not first.enable_bucket else
                f"on, no upscale, steps {first.bucket_reso_steps}" if first.bucket_no_upscale else
                f"on, {first.min_bucket_reso}-{first.max_bucket_reso} px, steps {first.bucket_reso_steps}")
        lines.append(f"resolution {first.resolution[0]}x{first.resolution[1]}, buckets {mode}: "
                     f"{len(self.buckets)} in use")
        for bucket, count in self.bucket_counts.items():
            lines.append(f"  {bucket[0]:>5}x{bucket[1]:<5} {count:>6} samples")
        options = [f"{k}={getattr(first, k)!r}" for k in SUBSET_KEYS
                   if k not in ("num_repeats", "caption_extension") and getattr(first, k) != FLAG_DEFAULTS[k]]
        lines.append("captions and augmentation: " + (", ".join(options) if options else "defaults")
                     + f"; seed {self.seed}")
        if self._latents is not None:
            skipped = f" ({len(self._replacement)} undecodable images replaced)" if self._replacement else ""
            lines.append("latents: cached" + skipped)
        return "\n".join(lines)

    def __repr__(self):
        return self.summary()


# options that draw a new crop or colour every time: a cached latent cannot follow them
_UNCACHEABLE = {"random_crop": "a cached latent has one fixed crop", "color_aug": "a cached latent has one fixed "
                "colour", "face_crop_aug_range": "a cached latent has one fixed crop"}


def _name(subset) -> str:
    """A subset's name in kohya's ss_dataset_dirs / ss_tag_frequency: its folder, or its metadata file."""
    return subset.metadata_file.name if subset.metadata_file is not None else subset.image_dir.name


# ----------------------------------------------------------------------------------------------
# Batching

class BucketBatchSampler(torch.utils.data.Sampler):
    """Yields lists of sample indices, every batch from one bucket. The order is a function of
    (seed, epoch): call set_epoch(epoch) before each epoch (it also sets the dataset's epoch).
    To resume mid-epoch, set `skip_batches` (or pass it): the next iteration yields only the remaining
    batches of that epoch, and len() counts those; later epochs are whole again."""

    def __init__(self, dataset, batch_size, seed=0, shuffle=True, drop_last=False, skip_batches=0):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DatasetError(f"train_batch_size must be an integer >= 1, got {batch_size!r}")
        buckets = dataset.sample_buckets if hasattr(dataset, "sample_buckets") else list(dataset)
        self.dataset = dataset if hasattr(dataset, "set_epoch") else None
        self.groups = defaultdict(list)
        for index, bucket in enumerate(buckets):
            self.groups[tuple(bucket)].append(index)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.epoch = 0
        self.skip_batches = skip_batches

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)
        if self.dataset is not None:
            self.dataset.set_epoch(epoch)

    def batches(self, epoch=None):
        """All batches of an epoch, in order."""
        rng = random.Random(f"{self.seed}/{self.epoch if epoch is None else epoch}/batches")
        batches = []
        for bucket in sorted(self.groups):
            indices = list(self.groups[bucket])
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    @property
    def num_batches_per_epoch(self) -> int:
        sizes = [len(v) for v in self.groups.values()]
        if self.drop_last:
            return sum(n // self.batch_size for n in sizes)
        return sum(math.ceil(n / self.batch_size) for n in sizes)

    def __iter__(self):
        batches = self.batches()
        skip, self.skip_batches = self.skip_batches, 0
        yield from batches[skip:]

    def __len__(self):
        return max(0, self.num_batches_per_epoch - self.skip_batches)


def collate_fn(items):
    """A list of dataset items -> {"images" or "latents": stacked, "captions", "is_reg", "paths", "buckets",
    "original_sizes" (w, h) and "crops" (left, top) per item (SDXL's size and crop conditioning), and
    "alpha_masks" (B, H, W) in [0, 1] at pixel size when some item has a loss mask (ones for those without)}."""
    batch = {"captions": [item["caption"] for item in items],
             "is_reg": torch.tensor([item["is_reg"] for item in items], dtype=torch.bool),
             "paths": [item["path"] for item in items],
             "buckets": [item["bucket"] for item in items]}
    if all("original_size" in item and "crop" in item for item in items):  # items of other datasets may lack them
        batch["original_sizes"] = [tuple(item["original_size"]) for item in items]
        batch["crops"] = [tuple(item["crop"]) for item in items]
    if len(set(batch["buckets"])) > 1:
        raise DatasetError(f"a batch mixes buckets {sorted(set(batch['buckets']))}: use BucketBatchSampler "
                           f"(or enable_bucket=False) so that all images in a batch have one size")
    masks = [item.get("alpha_mask") for item in items]
    if any(mask is not None for mask in masks):  # kohya's rule: an item without a mask learns everywhere
        batch["alpha_masks"] = torch.stack([torch.ones(tuple(item["bucket"])[::-1]) if mask is None else mask
                                            for item, mask in zip(items, masks)])
    have_latents = [item.get("latents") is not None for item in items]
    if all(have_latents):
        batch["latents"] = torch.stack([item["latents"] for item in items])
    elif not any(have_latents):
        batch["images"] = torch.stack([item["image"] for item in items])
    else:
        raise DatasetError("a batch mixes cached latents and images")
    return batch
