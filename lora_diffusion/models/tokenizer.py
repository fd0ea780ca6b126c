"""The CLIP tokenizer of Stable Diffusion 1.x/2.x, built offline from the BPE file shipped in assets/.

CLIP's vocabulary is not stored as a list: it is derived from the BPE merges the way OpenAI's CLIP does it
(256 byte characters, the same 256 with an end-of-word mark, one token per merge, then the two special
tokens), 49408 tokens in all. We write the derived vocab.json/merges.txt once to a cache folder and load
them with transformers' CLIPTokenizer, so the ids are those of `openai/clip-vit-large-patch14`.
"""

import gzip
import json
import os
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

ASSETS = Path(__file__).parents[1] / "assets"
BPE_FILE = ASSETS / "clip_tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 256 - 256 - 2  # 48894
MAX_LENGTH = 77
CACHE_VERSION = "clip-bpe-16e6-v1"


def bytes_to_unicode():
    """The 256 printable stand-ins CLIP (and GPT-2) use for raw bytes, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clip_vocab_and_merges(bpe_file=BPE_FILE):
    """(vocab: token -> id, merges: ["a b", ...]) derived from CLIP's BPE file."""
    lines = gzip.open(bpe_file, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def cache_root():
    return Path(os.environ.get("LORA_DIFFUSION_CACHE", Path.home() / ".cache" / "lora_diffusion"))


def write_tokenizer_files(folder):
    """Write vocab.json and merges.txt (the files a CLIPTokenizer loads) into `folder`."""
    vocab, merges = clip_vocab_and_merges()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def tokenizer_files_folder():
    """A folder holding vocab.json/merges.txt, built once (atomically) in the cache, else in a temp folder."""
    target = cache_root() / CACHE_VERSION
    if (target / "vocab.json").exists() and (target / "merges.txt").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        write_tokenizer_files(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process won the race; its files are identical
            for f in staging.iterdir():
                f.unlink()
            staging.rmdir()
        return target
    except OSError:  # read-only home: build in a private temp folder instead
        return write_tokenizer_files(tempfile.mkdtemp(prefix="lora_diffusion_clip_"))


def save_tokenizer(tokenizer, folder):
    """Write a CLIP tokenizer of ours (CLIP's 49408 tokens; SD1's, SD2's or either of SDXL's) as vocab.json +
    merges.txt + tokenizer_config.json. transformers 4.x's CLIPTokenizer reads only vocab.json/merges.txt, and
    5.x's save_pretrained writes tokenizer.json alone, which 4.x cannot load; these files load in both (and are
    2 MB smaller)."""
    if len(tokenizer) != VOCAB_SIZE:
        raise ValueError(f"save_tokenizer writes CLIP's {VOCAB_SIZE} tokens; this tokenizer has {len(tokenizer)}")
    folder = write_tokenizer_files(folder)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": str(tokenizer.pad_token)}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.model_max_length,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return folder


def load_clip_tokenizer(v2=False):
    """The CLIP tokenizer of SD1.x (pads with <|endoftext|>) or SD2.x (pads with "!", id 0), 77 tokens."""
    return CLIPTokenizer.from_pretrained(
        str(tokenizer_files_folder()),
        pad_token="!" if v2 else "<|endoftext|>",
        model_max_length=MAX_LENGTH,
        local_files_only=True,
    )
