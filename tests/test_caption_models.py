"""The transformers captioners on tiny random models built from their configs here (no downloads): the prompt each
sends, how its output is decoded (the prompt's tokens dropped or kept) and post-processed. The words are random;
the expected captions are computed here from the same model's own generate() output."""

import re

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402

from lora_diffusion import cli  # noqa: E402
from lora_diffusion.captioning import CaptionError  # noqa: E402
from lora_diffusion.captioning.blip import BlipCaptioner  # noqa: E402
from lora_diffusion.captioning.florence2 import Florence2Captioner  # noqa: E402
from lora_diffusion.captioning.kosmos2 import Kosmos2Captioner  # noqa: E402
from lora_diffusion.captioning.vlm import VLMCaptioner  # noqa: E402

T = transformers
WORDS = ("a an the image of red blue green star circle square on background photo dog cat is in with and describe "
         "this detail : what does show ? paragraph").split()
SMALL = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)


def tokenizer(special=(), bos="<s>", eos="</s>", template=False, named=None):
    """A word-level tokenizer over WORDS (decoding joins words with spaces); `template`: BOS ... EOS around each
    text, as BERT's and XLM-R's tokenizers do."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<unk>", bos, eos, *WORDS]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    if template:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}",
                                                          special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                     unk_token="<unk>", extra_special_tokens=named)
    if special:
        fast.add_tokens(list(special), special_tokens=True)
    return fast


def images():
    return [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGBA", (24, 36), (10, 200, 10, 128))]


class Spy:
    """Records the text each processor call gets."""

    def __init__(self, processor):
        self.texts = []
        original = processor.__call__
        spy = self

        class Wrapped(type(processor)):
            def __call__(self, *args, **kwargs):
                spy.texts.append(kwargs.get("text"))
                return original(*args, **kwargs)

        processor.__class__ = Wrapped
        processor.__dict__["texts"] = self.texts


def reference_ids(captioner, imgs):
    """The model's own greedy output for the captioner's inputs (generate is deterministic)."""
    prompts = captioner.prompts(imgs)
    batch = captioner.inputs(imgs, prompts)
    return captioner.generate(batch), batch, prompts


# --- Kosmos-2

def kosmos2(tmp=None):
    tk = tokenizer(template=True)
    processor = T.Kosmos2Processor(T.CLIPImageProcessorPil(size={"shortest_edge": 28},
                                                           crop_size={"height": 28, "width": 28}), tk,
                                   num_patch_index_tokens=16)
    processor.num_image_tokens = 4
    config = T.Kosmos2Config(
        text_config=dict(vocab_size=len(processor.tokenizer), embed_dim=32, layers=1, ffn_dim=37, attention_heads=2,
                         max_position_embeddings=96, bos_token_id=tk.bos_token_id, eos_token_id=tk.eos_token_id,
                         pad_token_id=tk.pad_token_id),
        vision_config=dict(**SMALL, image_size=28, patch_size=14), latent_query_num=4)
    torch.manual_seed(0)
    return T.Kosmos2ForConditionalGeneration(config).eval(), processor


def test_kosmos2_prompt_decoding_and_cleanup():
    model, processor = kosmos2()
    Spy(processor)
    captioner = Kosmos2Captioner(model, processor, max_new_tokens=8)
    imgs = images()
    got = captioner.caption_batch(imgs)
    assert processor.texts[0] == ["<grounding>Describe this image in detail:"] * 2
    ids, _, prompts = reference_ids(captioner, imgs)
    for text, caption in zip(processor.batch_decode(ids, skip_special_tokens=True), got):
        body = text.split("</image>")[-1]  # after the image; the tags and patch indices (boxes) go
        expected = " ".join(re.sub(r"<[^>]*>", " ", body).split())
        expected = expected.removeprefix("Describe this image in detail:").strip()
        assert caption == expected and "<" not in caption
    # the post-processing of a real Kosmos-2 answer
    raw = ("<image>. the, to and of as in I that' for is was- on’ it with The as at bet he have from by are \" you "
           "his “ this said not has an ( but had we her they will my or were their): up about out who one all been "
           "she can more would It</image><grounding> Describe this image in detail:<phrase> a snowman</phrase>"
           "<object><patch_index_0044><patch_index_0863></object> warming himself by<phrase> a fire</phrase><object>"
           "<patch_index_0005><patch_index_0911></object>.")
    assert captioner.clean(raw, "<grounding>Describe this image in detail:", imgs[0]) == \
        "a snowman warming himself by a fire."
    assert captioner.clean(raw.replace(" Describe this image in detail:", " An image of"),
                           "<grounding>An image of", imgs[0]) == "a snowman warming himself by a fire."


# --- BLIP and BLIP-2

def blip():
    tk = tokenizer(bos="[CLS]", eos="[SEP]", template=True)
    config = T.BlipConfig(
        text_config=dict(vocab_size=len(tk), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=tk.bos_token_id, eos_token_id=tk.eos_token_id,
                         pad_token_id=tk.pad_token_id, sep_token_id=tk.eos_token_id, encoder_hidden_size=32),
        vision_config=dict(**SMALL, image_size=32, patch_size=16), projection_dim=32)
    torch.manual_seed(0)
    return T.BlipForConditionalGeneration(config).eval(), T.BlipProcessor(
        T.BlipImageProcessorPil(size={"height": 32, "width": 32}), tk)


def blip2():
    processor = T.Blip2Processor(T.BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer(),
                                 num_query_tokens=4)
    tk = processor.tokenizer
    config = T.Blip2Config(
        vision_config=dict(**SMALL, image_size=32, patch_size=16),
        qformer_config=dict(vocab_size=50, **SMALL, encoder_hidden_size=32),
        text_config=dict(model_type="opt", vocab_size=len(tk), hidden_size=32, ffn_dim=37, num_hidden_layers=1,
                         num_attention_heads=2, word_embed_proj_dim=32, bos_token_id=tk.bos_token_id,
                         eos_token_id=tk.eos_token_id, pad_token_id=tk.pad_token_id, max_position_embeddings=96),
        num_query_tokens=4, image_token_index=tk.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    return T.Blip2ForConditionalGeneration(config).eval(), processor


def test_blip_keeps_its_prefix_and_blip2_drops_the_question():
    imgs = images()
    model, processor = blip()
    captioner = BlipCaptioner(model, processor, prompt="a photo of", max_new_tokens=6, num_beams=1)
    got = captioner.caption_batch(imgs)
    ids, _, _ = reference_ids(captioner, imgs)
    assert got == [" ".join(t.split()) for t in processor.batch_decode(ids, skip_special_tokens=True)]
    assert all(caption.startswith("a photo of") for caption in got)  # BLIP writes the prefix again
    no_prompt = BlipCaptioner(model, processor, max_new_tokens=6, num_beams=2).caption_batch(imgs[:1])
    assert len(no_prompt) == 1 and isinstance(no_prompt[0], str)

    model, processor = blip2()
    Spy(processor)
    captioner = BlipCaptioner(model, processor, prompt="what does this show ?", max_new_tokens=6, num_beams=1)
    got = captioner.caption_batch(imgs)
    assert processor.texts[0] == ["what does this show ?"] * 2
    ids, batch, _ = reference_ids(captioner, imgs)
    width = batch["input_ids"].shape[1]
    assert (ids[:, :width] == batch["input_ids"]).all()  # generate() echoes the prompt ...
    assert got == [" ".join(t.split()) for t in processor.batch_decode(ids[:, width:], skip_special_tokens=True)]
    assert processor.tokenizer.padding_side == "left"  # ... and a batch continues every prompt from its end


def test_blip_loads_from_a_folder_by_model_type(tmp_path, capsys):
    for name, build in (("blip1", blip), ("blip2", blip2)):
        model, processor = build()
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        loaded, _ = BlipCaptioner.load(tmp_path / name, device="cpu", dtype="fp32")
        assert type(loaded).__name__ == type(model).__name__
    folder = tmp_path / "img"
    folder.mkdir()
    for i, image in enumerate(images()):
        image.save(folder / f"{i}.png")
    rc = cli.main(["caption", str(folder), "--captioner", "blip", "--model", str(tmp_path / "blip2"), "--threads",
                   "1", "--max_new_tokens", "4", "--num_beams", "1", "--batch_size", "2", "--out_ext", ".blip",
                   "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in folder.glob("*.blip")) == ["0.blip", "1.blip"]


# --- Florence-2

def florence2():
    tk = tokenizer(named={"image_token": "<image>"})
    processor = T.Florence2Processor(T.CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False),
                                     tk, post_processor_config={"pure_text": {}})
    config = T.Florence2Config(
        text_config=dict(vocab_size=len(tk), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                         max_position_embeddings=96, bos_token_id=tk.bos_token_id, eos_token_id=tk.eos_token_id,
                         pad_token_id=tk.pad_token_id, decoder_start_token_id=tk.eos_token_id),
        vision_config=dict(embed_dim=[8, 8, 8, 16], depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 2],
                           num_groups=[1, 1, 1, 2], projection_dim=32),
        image_token_id=tk.image_token_id)
    torch.manual_seed(0)
    model = T.Florence2ForConditionalGeneration(config).eval()
    features = model.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32))
    processor.num_image_tokens = getattr(features, "pooler_output", features).shape[-2]
    return model, processor


def test_florence2_task_prompt_and_pure_text_answer():
    model, processor = florence2()
    Spy(processor)
    imgs = images()
    captioner = Florence2Captioner(model, processor, task="<DETAILED_CAPTION>", max_new_tokens=6, num_beams=1)
    got = captioner.caption_batch(imgs)
    assert processor.texts[0] == ["<DETAILED_CAPTION>"] * 2  # the processor turns the task into its prompt
    ids, _, _ = reference_ids(captioner, imgs)
    expected = [" ".join(re.sub(r"</?s>|<pad>", " ", t).split()) for t in processor.batch_decode(ids)]
    assert got == expected and not any("<" in c for c in got)
    assert captioner.clean("</s><s>a red star on a blue background</s><pad>", "", imgs[0]) == \
        "a red star on a blue background"
    with pytest.raises(CaptionError, match="<OD>"):
        Florence2Captioner(model, processor, task="<OD>")


# --- Qwen2-VL (the vlm captioner)

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


class ImagesOnlyQwen2VLProcessor(T.Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor (that one needs torchvision, not installed here)."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


def qwen2_vl():
    tk = tokenizer(special=("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"),
                   eos="<|endoftext|>", named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    image_processor = T.Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4, patch_size=14,
                                                 merge_size=2, temporal_patch_size=2)
    processor = ImagesOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tk, chat_template=CHAT)
    ids = tk.convert_tokens_to_ids
    config = T.Qwen2VLConfig(
        text_config=dict(vocab_size=len(tk), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}, bos_token_id=tk.bos_token_id,
                         eos_token_id=tk.eos_token_id, pad_token_id=tk.pad_token_id),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"))
    torch.manual_seed(0)
    return T.Qwen2VLForConditionalGeneration(config).eval(), processor


def test_vlm_chat_prompt_and_answer_only():
    model, processor = qwen2_vl()
    Spy(processor)
    imgs = [images()[0], images()[1].resize((60, 20))]
    captioner = VLMCaptioner(model, processor, prompt="describe this image", max_new_tokens=5)
    got = captioner.caption_batch(imgs)
    sent = processor.texts[0]
    assert sent == ["<|im_start|>user <|vision_start|><|image_pad|><|vision_end|>describe this image<|im_end|> "
                    "<|im_start|>assistant "] * 2
    ids, batch, _ = reference_ids(captioner, imgs)
    answer = ids[:, batch["input_ids"].shape[1]:]
    assert got == [" ".join(t.split()) for t in processor.batch_decode(answer, skip_special_tokens=True)]
    assert captioner.clean('"a red star"', "", imgs[0]) == "a red star"


# --- the model classes and the errors

def test_transformers_has_every_model_class():
    for name in ("Kosmos2ForConditionalGeneration", "BlipForConditionalGeneration", "Blip2ForConditionalGeneration",
                 "Florence2ForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                 "Qwen2_5_VLForConditionalGeneration", "AutoModelForImageTextToText"):
        assert hasattr(transformers, name), name


def test_missing_model_is_one_line(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "img"
    folder.mkdir()
    images()[0].save(folder / "a.png")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for captioner, model in (("kosmos2", "nobody/no-such-kosmos"), ("vlm", str(tmp_path / "absent")),
                             ("florence2", "nobody/no-such-florence")):
        rc = cli.main(["caption", str(folder), "--captioner", captioner, "--model", model, "--threads", "1",
                       "--no_progress"])
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert rc == 2 and len(err) == 1 and model in err[0] and captioner in err[0], err
        if "/" in model and not model.startswith(str(tmp_path)):
            assert "hf download" in err[0]
