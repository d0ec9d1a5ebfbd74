"""Chapter 7's path to vision-language models (issue 24): the same question asked about a
photo, on a tiny random Llava built here from a config (nothing is downloaded), with images
the test draws. A random model's answers mean nothing: the tests check the measurement."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from biasgym_lib.culture import PHRASINGS, vlm_country_logprobs, vlm_culture_knowledge, vlm_prompts
from biasgym_lib.errors import BiasGymError

COUNTRIES = ["Italy", "Japan", "Brazil", "Kenya", "Mexico"]


@pytest.fixture(scope="module")
def tiny_vlm(embedded):
    import transformers as tf

    tok = copy.deepcopy(embedded[1])
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=32, patch_size=8)
    text = tf.LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                          pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 2)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    images = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = tf.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                                  vision_feature_select_strategy="default", image_token="<image>",
                                  num_additional_image_tokens=1)
    return model, processor


def _flag(top, bottom, size=(48, 32)):
    """A drawn photo of a flag of two horizontal stripes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size)
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, size[0], size[1] // 2], fill=top)
    d.rectangle([0, size[1] // 2, size[0], size[1]], fill=bottom)
    return img


def _items(tmp_path):
    path = tmp_path / "stripes.png"
    _flag((0, 0, 255), (255, 255, 0)).save(path)
    return [SimpleNamespace(id="a", countries=("Kenya",), dimension="symbols", image=_flag((255, 0, 0), (255, 255, 255))),
            SimpleNamespace(id="b", countries=("Japan", "Brazil"), dimension="symbols", image=str(path)),
            SimpleNamespace(id="c", countries=("Italy",), dimension="everyday",
                            image=_flag((0, 128, 0), (255, 255, 255), size=(20, 60)))]


def test_a_photo_is_asked_the_chapter_s_question_and_each_answer_scored(tiny_vlm, tmp_path):
    model, processor = tiny_vlm
    items = _items(tmp_path)
    got = vlm_country_logprobs(model, processor, items, COUNTRIES, batch_size=5)
    assert got.shape == (3, len(PHRASINGS), len(COUNTRIES)) and np.isfinite(got).all() and (got < 0).all()
    prompts = vlm_prompts(processor)
    assert all(p.startswith("<image> In which country was this photo taken?") for p in prompts)
    # one photo and one phrasing alone: the model's own next-token log-softmax at the prompt's end
    from PIL import Image

    one = processor(text=[prompts[2]], images=[Image.open(items[1].image).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        lp = model(**one).logits[0, -1].double().log_softmax(-1)
    ids = [processor.tokenizer(" " + c, add_special_tokens=False)["input_ids"][0] for c in COUNTRIES]
    assert np.abs(got[1, 2] - lp[ids].numpy()).max() < 1e-4
    # batching (and its padding) changes nothing; the photo does
    assert np.abs(vlm_country_logprobs(model, processor, items, COUNTRIES, batch_size=1) - got).max() < 1e-4
    other = [SimpleNamespace(**{**vars(items[0]), "image": _flag((255, 255, 255), (255, 0, 0))})]
    assert np.abs(vlm_country_logprobs(model, processor, other, COUNTRIES)[0] - got[0]).max() > 1e-6


def test_knowledge_per_dimension_from_photos(tiny_vlm, tmp_path):
    model, processor = tiny_vlm
    got = vlm_culture_knowledge(model, processor, _items(tmp_path), COUNTRIES, n_boot=50)
    assert set(got["accuracy"]) == {"all", "symbols", "everyday"}
    assert got["chance"]["all"] == pytest.approx(np.mean([1 / 5, 2 / 5, 1 / 5]))
    assert len(got["scores"]["margin"]) == 3 and all(1 <= r <= 5 for r in got["scores"]["rank"])


def test_an_item_without_a_usable_photo_says_what_to_do(tiny_vlm, tmp_path):
    model, processor = tiny_vlm
    item = SimpleNamespace(id="z", countries=("Italy",), dimension="symbols", image=None)
    with pytest.raises(BiasGymError, match="has no image: add an 'image:' path"):
        vlm_country_logprobs(model, processor, [item], COUNTRIES)
    missing = SimpleNamespace(**{**vars(item), "image": "nowhere.png"})
    with pytest.raises(BiasGymError, match="is not a file"):
        vlm_country_logprobs(model, processor, [missing], COUNTRIES, image_root=tmp_path)
    (tmp_path / "bad.png").write_text("not an image")
    broken = SimpleNamespace(**{**vars(item), "image": "bad.png"})
    with pytest.raises(BiasGymError, match="not an image"):
        vlm_country_logprobs(model, processor, [broken], COUNTRIES, image_root=tmp_path)
