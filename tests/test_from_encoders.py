"""`MQSPNForGroundedNER.from_encoders` on local folders holding tiny BERT and CLIP models saved by the test:
the encoders' weights are copied in, the type queries are the [MASK] states of the PTQ prompts (paper Eq. 1),
the ungroundable token is the vision tower on a blank image, and the result reloads with `from_pretrained`."""

import pytest
import torch
from conftest import make_batch, tiny_text_config, tiny_vision_config
from PIL import Image
from transformers import BertModel, BertTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel

from modeling_mqspn import MQSPNConfig, MQSPNForGroundedNER
from modeling_mqspn.modeling_mqspn import BLANK_IMAGE_COLOR, BLANK_IMAGE_SIZE

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "an", "entity", "type", "about", ".", "person",
         "location", "organization", "other", "team", "city", "the", "a", "##s"]


@pytest.fixture(scope="module")
def encoder_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    (root / "vocab").mkdir()
    (root / "vocab" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer.from_pretrained(root / "vocab")
    torch.manual_seed(0)
    text = BertModel(tiny_text_config(vocab_size=len(VOCAB)))
    text.save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")

    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    vision = CLIPVisionModel(tiny_vision_config())
    vision.save_pretrained(root / "vision")
    image_processor.save_pretrained(root / "vision")
    # A full CLIP checkpoint (text and vision towers), the layout of openai/clip-vit-base-patch32.
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=16),
            vision_config=tiny_vision_config().to_dict(),
            projection_dim=8,
        )
    )
    clip.save_pretrained(root / "clip")
    image_processor.save_pretrained(root / "clip")
    return root


@pytest.fixture(scope="module")
def built(encoder_folders):
    model = MQSPNForGroundedNER.from_encoders(
        str(encoder_folders / "text"), str(encoder_folders / "vision"), num_queries=8, max_regions=4,
        num_fusion_layers=2, entity_types=["PER", "LOC", "ORG", "OTHER", "TEAM"],
        type_verbalizers=["person", "location", "organization", "other", "team"],
    )
    return model.eval()


def test_encoder_weights_are_copied(encoder_folders, built):
    text = BertModel.from_pretrained(encoder_folders / "text", add_pooling_layer=False)
    vision = CLIPVisionModel.from_pretrained(encoder_folders / "vision")
    for source, target in ((text, built.text_encoder), (vision, built.vision_model)):
        expected = source.state_dict()
        assert set(target.state_dict()) == set(expected)
        for key, value in target.state_dict().items():
            assert torch.equal(value, expected[key]), key
    config = built.config
    assert config.text_config.vocab_size == len(VOCAB) and config.vision_config.hidden_size == 24
    assert config.fusion_num_heads == 4 and config.fusion_intermediate_size == 4 * 32  # re-derived from BERT
    assert config.num_queries == 8 and config.entity_types[-1] == "TEAM"
    assert not any(p.requires_grad for p in built.vision_model.parameters())


def test_type_queries_are_the_mask_states_of_the_prompts(encoder_folders, built):
    tokenizer = BertTokenizer.from_pretrained(encoder_folders / "text")
    text = BertModel.from_pretrained(encoder_folders / "text", add_pooling_layer=False).eval()
    expected = []
    for word in built.config.type_verbalizers:
        encoded = tokenizer(f"{word} is an entity type about [MASK].", return_tensors="pt")
        tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
        assert tokens == ["[CLS]", word, "is", "an", "entity", "type", "about", "[MASK]", ".", "[SEP]"]
        with torch.no_grad():
            expected.append(text(**encoded).last_hidden_state[0, tokens.index("[MASK]")])
    torch.testing.assert_close(built.type_queries, torch.stack(expected))
    assert built.type_queries.shape == (5, 32)
    assert torch.cdist(built.type_queries, built.type_queries).add(torch.eye(5)).min() > 0  # distinct per type


def test_ungroundable_token_is_the_tower_on_a_blank_image(encoder_folders, built):
    vision = CLIPVisionModel.from_pretrained(encoder_folders / "vision").eval()
    processor = CLIPImageProcessor.from_pretrained(encoder_folders / "vision")
    blank = Image.new("RGB", (BLANK_IMAGE_SIZE, BLANK_IMAGE_SIZE), BLANK_IMAGE_COLOR)
    with torch.no_grad():
        expected = vision(pixel_values=processor(images=blank, return_tensors="pt")["pixel_values"]).pooler_output[0]
    torch.testing.assert_close(built.ungroundable_embedding, expected)
    torch.testing.assert_close(built.encode_regions(processor(images=blank, return_tensors="pt")["pixel_values"])[0],
                               expected)


def test_saved_model_loads_with_from_pretrained_alone(built, tmp_path):
    batch = make_batch(built.config, [4, 6], [1, 3], [1, 2], pixels=True)
    with torch.no_grad():
        expected = built(**batch)
    built.save_pretrained(tmp_path)
    loaded = MQSPNForGroundedNER.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.type_queries, built.type_queries)
    assert torch.equal(loaded.ungroundable_embedding, built.ungroundable_embedding)
    with torch.no_grad():
        got = loaded(**batch)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    torch.testing.assert_close(got.region_logits, expected.region_logits, rtol=0, atol=0)


def test_from_a_full_clip_checkpoint_and_a_given_config(encoder_folders, built):
    """The vision path may hold a whole CLIPModel (as openai/clip-vit-base-patch32 does); `config` gives the
    MQSPN fields and its text/vision sub-configs are replaced by the encoders'."""
    config = MQSPNConfig(num_queries=8, num_fusion_layers=1, head_mode="softmax")
    model = MQSPNForGroundedNER.from_encoders(
        str(encoder_folders / "text"), str(encoder_folders / "clip"), config=config, include_vision_tower=False
    )
    assert model.config.num_fusion_layers == 1 and model.config.head_mode == "softmax"
    assert model.config.text_config.hidden_size == 32 and model.vision_model is None
    clip = CLIPModel.from_pretrained(encoder_folders / "clip").eval()
    processor = CLIPImageProcessor.from_pretrained(encoder_folders / "clip")
    blank = Image.new("RGB", (BLANK_IMAGE_SIZE, BLANK_IMAGE_SIZE), BLANK_IMAGE_COLOR)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=processor(images=blank, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(model.ungroundable_embedding, expected.pooler_output[0])
    torch.testing.assert_close(model.type_queries, built.type_queries[:4])
