"""`MQSPNProcessor`: one call turns tweets (words or raw strings), their images and candidate
regions into everything `MQSPNForGroundedNER` needs, aligned (paper §3.1 and §4.1; docs/DESIGN.md §1, §6,
§7; docs/ARCHITECTURE.md "Model inputs").

Text (docs/DESIGN.md §1). Tweets are tokenised as word lists (`is_split_into_words=True`); `word_ids`
maps every sub-word to its word (−1 for special and padding tokens). A word that yields no
sub-word at all (zero-width characters, empty strings) gets the tokenizer's unknown token, so every
word owns at least one sub-word. A tweet longer than `max_length` sub-words loses its last words;
a warning names the tweet and counts the gold entities that were cut with them.

Raw strings are split into words by `WORD_PATTERN`: a word is a maximal run of letters and digits
(`[^\\W_]+`), and every other non-space character is a word of its own; a combining mark stays with
the character before it (`split_words`). This is how the Twitter-GMNER CoNLL files are tokenised
(`RT @ MahaveerM _ :`, `We ' re`, `# ProudOfRAW`), so raw-string input looks like the training data.
Each word keeps its character span in the string (`word_offsets`, end exclusive), and predictions
point back into the string.

Regions (docs/DESIGN.md §1, §6). Candidate boxes (pixel `x1, y1, x2, y2`, detector order) come per tweet
as a list (or array / tensor). Finding them is not the processor's job: a region proposer
(`proposers_mqspn`: VinVL files, a transformers detector, selective search) or the `grounded-ner`
pipeline resolves them first. They are clipped to the image; degenerate and duplicate boxes are dropped and counted; the first
`max_regions` (k) are kept. Each kept box is cropped and turned into pixels by the CLIP image
processor (`prepare_crops`): `crop_mode="pad"` pads the crop to a square with the image processor's
mean colour first, so tall and wide boxes keep their whole content (docs/DESIGN.md §1); `"center"` hands
the raw crop to the image processor's own resize + centre crop (the authors' code). Precomputed
frozen vision-tower features (`region_features`) can replace the images; their boxes are then taken
as given, row for row. A missing or unreadable image is not fatal: the tweet gets no proposal (only
the model's ungroundable token) and a warning names it and counts such tweets.

Training labels (docs/DESIGN.md §5): an entity's regions are the proposals whose IoU with any of its gold
boxes is at least `region_iou_threshold` (0.5); an entity without boxes, or whose boxes no proposal
covers, has only region 0 ("no region").

Building a processor from a tokenizer folder and a CLIP image-processor folder::

    processor = MQSPNProcessor.from_tokenizer_and_image_processor(
        "path/to/bert-base-cased", "path/to/clip-vit-base-patch32", config=model.config
    )
    processor.save_pretrained("checkpoint")  # processor_config.json + tokenizer + image processor

Decoding settings. `post_process_grounded_ner(outputs, inputs, config)` reads them (`entity_types`,
`existence_threshold`, `max_span_words`) from the model config: a checkpoint's calibrated threshold
lives in one place.

Word indices. `start` / `end` of entities (gold and predicted) are word indices with an inclusive end
(`words[start : end + 1]` is the mention); for raw-string input `char_start` / `char_end` (end exclusive)
give the same mention in the string (`text[char_start:char_end]`).
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .box_ops import box_iou, sanitize_boxes
from .configuration_mqspn import DEFAULT_ENTITY_TYPES, DEFAULT_MAX_REGIONS
from .decoding_mqspn import decode_predictions
from .image_utils import load_rgb_image
from .interface_mqspn import LABELS_NAME, METADATA_NAMES, MODEL_INPUT_NAMES
from .schema_mqspn import as_box_list, parse_entity

__all__ = ["CROP_MODES", "MAX_PAD_SIDE", "MQSPNBatchFeature", "MQSPNProcessor", "WORD_PATTERN", "split_words"]

# A word is a run of letters/digits, or any single other non-space character (see module docstring).
WORD_PATTERN = re.compile(r"[^\W_]+|\S")
_WORD_CHAR = re.compile(r"[^\W_]")

CROP_MODES = ("pad", "center")

# In crop_mode "pad", a crop whose longer side exceeds this many pixels is first scaled down to it, so
# the padded square stays small (a 20000x100 crop would otherwise become a 1.2 GB, minute-long square);
# photos up to 4096 pixels (Twitter's largest) are cropped exactly as before.
MAX_PAD_SIDE = 4096

def _is_mark(char: str) -> bool:
    """A combining mark (Unicode category M*: accents, vowel signs, viramas, variation selectors)."""
    return unicodedata.category(char).startswith("M")


def split_words(text: str) -> Tuple[List[str], List[Tuple[int, int]]]:
    """Split a raw string into words by `WORD_PATTERN`; returns the words and their character
    spans `(start, end)` with `text[start:end] == word`.

    A combining mark belongs to the character before it, and a letter word goes on through its
    marks: a decomposed "Zürich" (u + U+0308) and Devanagari "हिन्दी" are one word each (the pattern
    alone cuts them at every mark, since a mark is not a letter)."""
    spans: List[Tuple[int, int]] = []
    for match in WORD_PATTERN.finditer(text):
        start, end = match.span()
        if spans and spans[-1][1] == start and (
            _is_mark(text[start])
            or (_is_mark(text[start - 1]) and _WORD_CHAR.match(text[start]) and _WORD_CHAR.match(text[spans[-1][0]]))
        ):
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return [text[start:end] for start, end in spans], spans


class MQSPNBatchFeature(BatchFeature):
    """`BatchFeature` whose `.to()` also moves the per-tweet `labels` dicts, and never casts the
    pixel boxes (`region_boxes`) or other metadata to a lower-precision dtype.

    Besides the model inputs it carries what post-processing needs (`region_boxes`, `image_sizes`,
    `words`, and `text` / `word_offsets` for raw strings; `interface_mqspn.METADATA_NAMES`), which
    `MQSPNForGroundedNER.forward` accepts and ignores: `model(**inputs)`.
    """

    def to(self, *args, **kwargs) -> "MQSPNBatchFeature":
        device = kwargs.get("device")
        if device is None and args and not isinstance(args[0], torch.dtype):
            device = args[0]
        non_blocking = kwargs.get("non_blocking", False)
        kept = {key: self.data.pop(key) for key in (LABELS_NAME,) + METADATA_NAMES if key in self.data}
        super().to(*args, **kwargs)
        for key, value in kept.items():
            if device is not None:
                if key == LABELS_NAME:
                    value = [
                        {name: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v
                         for name, v in item.items()}
                        for item in value
                    ]
                elif torch.is_tensor(value):
                    value = value.to(device, non_blocking=non_blocking)
            self.data[key] = value
        return self


class MQSPNProcessor(ProcessorMixin):
    """Tokenizer + CLIP image processor + candidate regions for MQSPN.

    Args:
        image_processor: a CLIP image processor (crops of the candidate regions).
        tokenizer: the text encoder's tokenizer (BERT family).
        entity_types (`list[str]`, defaults to `["PER", "LOC", "ORG", "OTHER"]`): label space; a
            gold entity's type must be one of them, and its index is the label.
        max_regions (`int`, defaults to 18): k, the most proposals kept per image (paper §4.1).
        crop_mode (`str`, defaults to `"pad"`): `"pad"` (pad the crop to a square, then the image
            processor) or `"center"` (the image processor's resize + centre crop).
        region_iou_threshold (`float`, defaults to 0.5): IoU with a gold box at which a proposal
            is one of an entity's regions (docs/DESIGN.md §5).
        max_length (`int`, defaults to 512): most sub-words per tweet, special tokens included
            (capped by the tokenizer's `model_max_length`).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        entity_types=None,
        max_regions=DEFAULT_MAX_REGIONS,
        crop_mode="pad",
        region_iou_threshold=0.5,
        max_length=512,
        **kwargs,
    ):
        if crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
        if int(max_regions) < 0:
            raise ValueError(f"max_regions must be >= 0, got {max_regions}")
        if not 0.0 < float(region_iou_threshold) <= 1.0:
            raise ValueError(f"region_iou_threshold must be in (0, 1], got {region_iou_threshold}")
        if int(max_length) < 3:
            raise ValueError(f"max_length must leave room for a word and the special tokens, got {max_length}")
        self.entity_types = list(entity_types) if entity_types is not None else list(DEFAULT_ENTITY_TYPES)
        if len(set(self.entity_types)) != len(self.entity_types) or not self.entity_types:
            raise ValueError(f"entity_types must be non-empty and without duplicates, got {self.entity_types}")
        self.max_regions = int(max_regions)
        self.crop_mode = crop_mode
        self.region_iou_threshold = float(region_iou_threshold)
        self.max_length = int(max_length)
        for legacy in ("existence_threshold", "max_span_words"):
            if legacy in kwargs:  # saved by processors before 0.2; the model config holds them now
                kwargs.pop(legacy)
                warnings.warn(f"MQSPNProcessor: ignoring the saved {legacy!r}; decoding reads the model config's")
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_tokenizer_and_image_processor(
        cls, tokenizer_name_or_path, image_processor_name_or_path, config=None, **kwargs
    ) -> "MQSPNProcessor":
        """Build a processor from a tokenizer folder (or Hub name) and a CLIP image-processor
        folder. With `config` (an `MQSPNConfig`), `entity_types`, `max_regions`,
        `max_regions` are copied from it; `kwargs` set any attribute
        explicitly."""
        from transformers import AutoImageProcessor, AutoTokenizer

        attributes = {}
        if config is not None:
            attributes = {
                name: getattr(config, name)
                for name in ("entity_types", "max_regions")
            }
        attributes.update(kwargs)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
        image_processor = AutoImageProcessor.from_pretrained(image_processor_name_or_path)
        return cls(image_processor=image_processor, tokenizer=tokenizer, **attributes)

    @property
    def model_input_names(self) -> List[str]:
        """The output keys that `MQSPNForGroundedNER.forward` takes (besides `labels`)."""
        return list(MODEL_INPUT_NAMES)

    # ------------------------------------------------------------------------------------------
    # __call__
    # ------------------------------------------------------------------------------------------

    def __call__(
        self,
        words=None,
        text=None,
        images=None,
        boxes=None,
        region_features=None,
        entities=None,
        ids=None,
        image_sizes=None,
        return_tensors="pt",
        max_length=None,
    ) -> MQSPNBatchFeature:
        """Prepare one tweet or a batch.

        Args:
            words: a tweet as a list of words, or a batch as a list of such lists.
            text: a tweet as a raw string, or a batch as a list of strings (split by
                `WORD_PATTERN`). Give exactly one of `words` / `text`.
            images: per tweet an image path (or URL / base64 string), PIL image, HWC uint8 numpy
                array, or None (no image); a batch takes a list. Read upright (EXIF orientation
                applied). Unreadable or missing files give that tweet no proposal (a counted warning
                names it).
            boxes: the candidate regions, per tweet a list (array, tensor) of pixel `[x1, y1, x2, y2]`
                in detector order, or None. To find them, run a region proposer first
                (`modeling_mqspn.get_proposer(...).propose(image)`) or use the `grounded-ner` pipeline.
            region_features: instead of `images`, per tweet a `(k_i, D_v)` array of precomputed
                frozen vision-tower features; `boxes` then gives those proposals' boxes, row for row.
            entities: training labels, per tweet a list of `{"start", "end", "type", "boxes"}`
                (word indices, inclusive end; `boxes` a list of pixel boxes, empty or absent = not
                groundable).
            ids: per tweet an id (string), used in warnings and errors and set as the labels' `"id"`.
            image_sizes: per tweet `(width, height)` for tweets given without an image (only
                reported in `image_sizes`).
            return_tensors: only `"pt"`.
            max_length: most sub-words per tweet for this call (default: the processor's
                `max_length`); the grounded-ner pipeline passes the text encoder's
                `max_position_embeddings` when that is smaller.

        Returns:
            `MQSPNBatchFeature` with `input_ids`, `attention_mask`, `token_type_ids` (when the
            tokenizer has them), `word_ids` (B, S), `word_mask` (B, n) bool, `pixel_values`
            (B, K, 3, H, W) when images are given or `region_features` (B, K, D_v) when features are
            given, `region_mask` (B, K) bool, `region_boxes` (B, K, 4) pixel boxes, `image_sizes` (B, 2)
            as (width, height) (0 when unknown), `words` (the kept words per tweet), and for raw
            strings `text` and `word_offsets` (B, n, 2) (−1 for padding); with `entities`, `labels`
            (list of B dicts, docs/ARCHITECTURE.md). K is the batch's most proposals (0..k).
        """
        if return_tensors != "pt":
            raise ValueError(f"MQSPNProcessor returns PyTorch tensors only (return_tensors='pt'), not {return_tensors!r}")
        if (words is None) == (text is None):
            raise ValueError("give exactly one of `words` (pre-split tweets) or `text` (raw strings)")

        texts, offsets = None, None
        if text is not None:
            is_batch = not isinstance(text, str)
            texts = list(text) if is_batch else [text]
            for index, item in enumerate(texts):
                if not isinstance(item, str):
                    raise TypeError(f"text[{index}] is a {type(item).__name__}; `text` takes strings")
            split = [split_words(item) for item in texts]
            batch_words = [item[0] for item in split]
            offsets = [item[1] for item in split]
        else:
            is_batch = isinstance(words, (list, tuple)) and len(words) > 0 and not isinstance(words[0], str)
            batch_words = [list(item) for item in words] if is_batch else [list(words)]
            for index, item in enumerate(batch_words):
                if not all(isinstance(word, str) for word in item):
                    raise TypeError(f"words of sample {index} must be strings, got {item!r}")
        batch_size = len(batch_words)

        sample_ids = self._per_sample(ids, "ids", is_batch, batch_size)
        names = [str(sid) if sid is not None else f"#{index}" for index, sid in enumerate(sample_ids)]
        for name, item in zip(names, batch_words):
            if not item:
                raise ValueError(f"sample {name} has no words; every tweet needs at least one word")

        if images is not None and region_features is not None:
            raise ValueError("give either `images` (proposals are cropped) or `region_features`, not both")
        batch_boxes = self._per_sample(boxes, "boxes", is_batch, batch_size)
        for name, spec in zip(names, batch_boxes):
            if hasattr(spec, "propose") or isinstance(spec, (str, os.PathLike)):
                raise TypeError(
                    f"sample {name}: `boxes` takes pixel boxes, not {type(spec).__name__}; find the proposals first "
                    "(e.g. `get_proposer('vinvl', directory=...).propose(image_path)`), or use the grounded-ner "
                    "pipeline with proposer=..."
                )
        batch_images = self._per_sample(images, "images", is_batch, batch_size)
        batch_features = self._per_sample(region_features, "region_features", is_batch, batch_size)
        batch_entities = self._per_sample(entities, "entities", is_batch, batch_size)
        batch_sizes = self._per_sample(image_sizes, "image_sizes", is_batch, batch_size)

        checked = None
        if entities is not None:
            checked = [
                [self._check_entity(names[index], number, entity, len(batch_words[index]))
                 for number, entity in enumerate(sample or [])]
                for index, sample in enumerate(batch_entities)
            ]
        encoding = self._tokenize(batch_words, names, checked, max_length)
        kept_words = [item[: encoding["num_words"][index]] for index, item in enumerate(batch_words)]

        regions = self._regions(
            names, batch_images, batch_boxes, batch_features, batch_sizes,
            use_pixels=images is not None, use_features=region_features is not None,
        )

        data: Dict[str, Any] = {
            "input_ids": encoding["input_ids"],
            "attention_mask": encoding["attention_mask"],
        }
        if encoding["token_type_ids"] is not None:
            data["token_type_ids"] = encoding["token_type_ids"]
        data["word_ids"] = encoding["word_ids"]
        data["word_mask"] = encoding["word_mask"]
        if "pixel_values" in regions:
            data["pixel_values"] = regions["pixel_values"]
        if "region_features" in regions:
            data["region_features"] = regions["region_features"]
        data["region_mask"] = regions["region_mask"]
        data["region_boxes"] = regions["region_boxes"]
        data["image_sizes"] = regions["image_sizes"]
        data["words"] = kept_words
        if texts is not None:
            data["text"] = texts
            n = data["word_mask"].shape[1]
            word_offsets = torch.full((batch_size, n, 2), -1, dtype=torch.long)
            for index, item in enumerate(offsets):
                kept = item[: encoding["num_words"][index]]
                word_offsets[index, : len(kept)] = torch.tensor(kept, dtype=torch.long).reshape(-1, 2)
            data["word_offsets"] = word_offsets
        if entities is not None:
            data["labels"] = self._labels(
                checked, sample_ids if ids is not None else None,
                encoding["num_words"], regions["proposals"], regions["region_mask"].shape[1],
            )
        return MQSPNBatchFeature(data=data)

    @staticmethod
    def _per_sample(value, name: str, is_batch: bool, batch_size: int) -> list:
        """A per-tweet argument as a list of `batch_size` entries."""
        if value is None:
            return [None] * batch_size
        if not is_batch:
            return [value]
        if isinstance(value, (str, bytes, os.PathLike)) or not hasattr(value, "__len__"):
            raise TypeError(f"`{name}` must be a list with one entry per tweet for a batch input")
        if len(value) != batch_size:
            raise ValueError(f"`{name}` has {len(value)} entries but the batch has {batch_size} tweets")
        return list(value)

    # ------------------------------------------------------------------------------------------
    # Text
    # ------------------------------------------------------------------------------------------

    def _tokenize(self, batch_words: List[List[str]], names: List[str], batch_entities, max_length=None) -> Dict[str, Any]:
        """Sub-word ids aligned to words (docs/DESIGN.md §1): every word owns at least one sub-word (the
        unknown token when the tokenizer yields none), and a tweet over `max_length` sub-words loses
        its last words with a warning that counts the gold entities lost with them."""
        tokenizer = self.tokenizer
        max_length = self.max_length if max_length is None else int(max_length)
        if max_length < 3:
            raise ValueError(f"max_length must leave room for a word and the special tokens, got {max_length}")
        max_length = min(max_length, int(getattr(tokenizer, "model_max_length", max_length)))
        encoding = tokenizer(
            batch_words, is_split_into_words=True, add_special_tokens=True, truncation=False, verbose=False
        )
        has_types = "token_type_ids" in encoding
        rows, truncated = [], []
        for index, item in enumerate(batch_words):
            ids = list(encoding["input_ids"][index])
            types = list(encoding["token_type_ids"][index]) if has_types else [0] * len(ids)
            word_of = encoding.word_ids(index)
            positions = [i for i, w in enumerate(word_of) if w is not None]
            first, last = (positions[0], positions[-1]) if positions else (self._num_prefix_specials(), None)
            prefix = slice(0, first)
            suffix = slice(last + 1 if positions else first, len(ids))
            per_word: List[List[Tuple[int, int]]] = [[] for _ in item]  # (sub-word id, token type) per word
            for position in positions:
                per_word[word_of[position]].append((ids[position], types[position]))
            if not all(per_word):
                if tokenizer.unk_token_id is None:
                    raise ValueError(
                        f"sample {names[index]}: a word yields no sub-word and the tokenizer has no unknown token "
                        "to stand for it; remove the empty or invisible words"
                    )
                per_word = [tokens if tokens else [(tokenizer.unk_token_id, 0)] for tokens in per_word]

            budget = max_length - (prefix.stop - prefix.start) - (suffix.stop - suffix.start)
            num_words, used = 0, 0
            while num_words < len(per_word) and used + len(per_word[num_words]) <= budget:
                used += len(per_word[num_words])
                num_words += 1
            if num_words == 0:
                raise ValueError(
                    f"sample {names[index]}: max_length={max_length} leaves no room for its first word "
                    f"({len(per_word[0])} sub-words); raise max_length"
                )
            if num_words < len(per_word):
                truncated.append((index, num_words, sum(len(t) for t in per_word)))

            row_ids = ids[prefix]
            row_types = types[prefix]
            row_words = [-1] * len(row_ids)
            for word, tokens in enumerate(per_word[:num_words]):
                row_ids += [token for token, _ in tokens]
                row_types += [kind for _, kind in tokens]
                row_words += [word] * len(tokens)
            row_ids += ids[suffix]
            row_types += types[suffix]
            row_words += [-1] * (suffix.stop - suffix.start)
            rows.append((row_ids, row_types, row_words, num_words))

        if truncated:
            self._warn_truncation(truncated, batch_words, names, batch_entities, max_length)

        batch_size = len(rows)
        seq_len = max(len(row[0]) for row in rows)
        num_words_max = max(row[3] for row in rows)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
        token_type_ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
        word_ids = torch.full((batch_size, seq_len), -1, dtype=torch.long)
        word_mask = torch.zeros((batch_size, num_words_max), dtype=torch.bool)
        for index, (row_ids, row_types, row_words, num_words) in enumerate(rows):
            length = len(row_ids)
            input_ids[index, :length] = torch.tensor(row_ids, dtype=torch.long)
            attention_mask[index, :length] = 1
            token_type_ids[index, :length] = torch.tensor(row_types, dtype=torch.long)
            word_ids[index, :length] = torch.tensor(row_words, dtype=torch.long)
            word_mask[index, :num_words] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids if has_types else None,
            "word_ids": word_ids,
            "word_mask": word_mask,
            "num_words": [row[3] for row in rows],
        }

    def _num_prefix_specials(self) -> int:
        """How many special tokens the tokenizer puts before the words ([CLS] for BERT)."""
        probe = self.tokenizer([["a"]], is_split_into_words=True, add_special_tokens=True)
        return next(i for i, w in enumerate(probe.word_ids(0)) if w is not None)

    @staticmethod
    def _warn_truncation(truncated, batch_words, names, batch_entities, max_length) -> None:
        lines, total_lost = [], 0
        for index, num_words, num_subwords in truncated:
            lost = [
                (start, end, type_name)
                for start, end, type_name, _, _ in (batch_entities[index] if batch_entities is not None else [])
                if end >= num_words
            ]
            total_lost += len(lost)
            lines.append(
                f"sample {names[index]}: {num_subwords} word sub-words, kept words 0..{num_words - 1} of "
                f"{len(batch_words[index])}; {len(lost)} gold entities lost" + (f" {lost}" if lost else "")
            )
        warnings.warn(
            f"MQSPNProcessor: {len(truncated)} tweet(s) exceed max_length={max_length} sub-words and were "
            f"truncated at a word boundary ({total_lost} gold entities lost in total):\n  " + "\n  ".join(lines),
            UserWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------------------------------
    # Regions
    # ------------------------------------------------------------------------------------------

    def _regions(self, names, batch_images, batch_boxes, batch_features, batch_sizes, use_pixels, use_features):
        """Proposals, crops or features, masks and pixel boxes for the batch (paper §3.1)."""
        batch_size = len(names)
        proposals: List[List[Tuple[float, float, float, float]]] = []
        region_inputs: List[Optional[torch.Tensor]] = []
        sizes: List[Tuple[int, int]] = []
        unreadable, dropped, boxless = [], [], []
        for index in range(batch_size):
            name, spec = names[index], batch_boxes[index]
            size = batch_sizes[index]
            size = (int(size[0]), int(size[1])) if size is not None else (0, 0)
            if use_features:
                kept, features = self._given_features(name, batch_features[index], spec)
                proposals.append(kept)
                region_inputs.append(features)
                sizes.append(size)
                continue
            image = None
            if batch_images[index] is not None:
                image, error = self._load_image(batch_images[index])
                if image is None:
                    unreadable.append(f"{name} ({error})")
            elif spec is not None and len(spec) > 0:
                raise ValueError(
                    f"sample {name}: candidate boxes were given but no image to crop them from; give its "
                    "image, or its precomputed `region_features`"
                )
            if image is None:
                proposals.append([])
                region_inputs.append(None)
                sizes.append(size)
                continue
            if spec is None:
                boxless.append(name)
            kept, num_dropped = self._sanitised_boxes(name, spec, image)
            if num_dropped:
                dropped.append((name, num_dropped))
            proposals.append(kept)
            region_inputs.append(self.prepare_crops(image, kept) if kept else None)
            sizes.append(image.size)

        if unreadable:
            warnings.warn(
                f"MQSPNProcessor: {len(unreadable)} of {batch_size} image(s) could not be read; these tweets get no "
                f"region proposal (only the ungroundable token): {', '.join(unreadable)}",
                UserWarning,
                stacklevel=3,
            )
        if boxless:
            warnings.warn(
                f"MQSPNProcessor: {len(boxless)} of {batch_size} tweet(s) have an image but no boxes and no proposer, "
                f"so they get zero regions and nothing can be grounded: {', '.join(boxless)}. Give boxes=[[x1, y1, x2, "
                "y2], ...] per tweet (a proposer's propose(image) finds them: proposers_mqspn.get_proposer), or use "
                "the grounded-ner pipeline with proposer=...",
                UserWarning,
                stacklevel=3,
            )
        if dropped:
            warnings.warn(
                f"MQSPNProcessor: dropped {sum(count for _, count in dropped)} non-finite, degenerate or duplicate "
                f"proposal box(es) in {len(dropped)} tweet(s): "
                + ", ".join(f"{name} ({count})" for name, count in dropped),
                UserWarning,
                stacklevel=3,
            )

        num_regions = max((len(kept) for kept in proposals), default=0)
        region_mask = torch.zeros((batch_size, num_regions), dtype=torch.bool)
        region_boxes = torch.zeros((batch_size, num_regions, 4), dtype=torch.float32)
        for index, kept in enumerate(proposals):
            region_mask[index, : len(kept)] = True
            if kept:
                region_boxes[index, : len(kept)] = torch.tensor(kept, dtype=torch.float32)
        out = {
            "proposals": proposals,
            "region_mask": region_mask,
            "region_boxes": region_boxes,
            "image_sizes": torch.tensor(sizes, dtype=torch.long).reshape(batch_size, 2),
        }
        if use_pixels:
            pixel_values = torch.zeros((batch_size, num_regions) + self._crop_shape(), dtype=torch.float32)
            for index, crops in enumerate(region_inputs):
                if crops is not None:
                    pixel_values[index, : crops.shape[0]] = crops
            out["pixel_values"] = pixel_values
        if use_features:
            dims = {features.shape[1] for features in region_inputs}
            if len(dims) > 1:
                raise ValueError(f"region_features have different widths D_v across the batch: {sorted(dims)}")
            width = dims.pop()
            region_features = torch.zeros((batch_size, num_regions, width), dtype=torch.float32)
            for index, features in enumerate(region_inputs):
                region_features[index, : features.shape[0]] = features
            out["region_features"] = region_features
        return out

    def _given_features(self, name, features, spec):
        """Precomputed region features and the boxes they were computed from, first k kept."""
        if features is None:
            raise ValueError(f"sample {name}: `region_features` has no entry; give a (0, D_v) array for no proposal")
        features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if features.dim() != 2:
            raise ValueError(f"sample {name}: region_features must have shape (k_i, D_v), got {tuple(features.shape)}")
        boxes = as_box_list(spec if spec is not None else [], f"sample {name}")
        if len(boxes) != features.shape[0]:
            raise ValueError(
                f"sample {name}: {features.shape[0]} region_features rows but {len(boxes)} boxes; give the boxes the "
                "features were computed from, in the same order (they place predictions in the image)"
            )
        return boxes[: self.max_regions], features[: self.max_regions]

    def _sanitised_boxes(self, name, spec, image: Image.Image):
        """The first k of one image's boxes, clipped to it, and how many boxes were dropped."""
        if spec is None:
            return [], 0
        width, height = image.size
        return sanitize_boxes(as_box_list(spec, f"sample {name}"), width, height, top_k=self.max_regions)

    @staticmethod
    def _load_image(image) -> Tuple[Optional[Image.Image], Optional[str]]:
        """An upright RGB PIL image (EXIF orientation applied, as the region proposers read it), or
        `(None, reason)` when a path is missing or unreadable."""
        if isinstance(image, (Image.Image, np.ndarray)):
            return load_rgb_image(image), None
        if isinstance(image, (str, os.PathLike)):
            try:
                return load_rgb_image(image), None
            except (ValueError, OSError) as error:
                return None, str(error)
        raise TypeError(f"images must be paths, PIL images, numpy arrays or None, got {type(image).__name__}")

    def prepare_crops(self, image, boxes) -> torch.FloatTensor:
        """Crop each pixel box from `image` and run the CLIP image processor (docs/DESIGN.md §1).

        `crop_mode="pad"` pads each crop to a square with the image processor's mean colour (0
        after normalisation) before resizing, so no part of the box is cut (a crop longer than
        `MAX_PAD_SIDE` pixels is scaled down to it first); `"center"` uses the
        image processor's resize + centre crop directly. The feature cache keys on `crop_mode`.

        Args:
            image: PIL image or HWC uint8 numpy array.
            boxes: (K, 4) pixel `x1, y1, x2, y2`; each is widened to whole pixels and clipped.

        Returns:
            FloatTensor (K, 3, H, W); K may be 0.
        """
        if not isinstance(image, (Image.Image, np.ndarray)):
            raise TypeError(f"prepare_crops takes a PIL image or a numpy array, got {type(image).__name__}")
        pil, _ = self._load_image(image)
        width, height = pil.size
        boxes = as_box_list(boxes, "prepare_crops")
        if not boxes:
            return torch.zeros((0,) + self._crop_shape(), dtype=torch.float32)
        crops = []
        fill = tuple(int(round(255 * m)) for m in getattr(self.image_processor, "image_mean", None) or (0, 0, 0))
        for box in boxes:
            left, top = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
            right, bottom = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
            if right <= left or bottom <= top:
                raise ValueError(f"box {list(box)} lies outside the {width}x{height} image or is empty")
            crop = pil.crop((left, top, right, bottom))
            if self.crop_mode == "pad":
                if max(crop.size) > MAX_PAD_SIDE:  # e.g. a 20000x100 panorama: never a 20000² square
                    scale = MAX_PAD_SIDE / max(crop.size)
                    crop = crop.resize(
                        (max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))), Image.BICUBIC
                    )
                side = max(crop.size)
                square = Image.new("RGB", (side, side), fill)
                square.paste(crop, ((side - crop.size[0]) // 2, (side - crop.size[1]) // 2))
                crop = square
            crops.append(crop)
        return self.image_processor(images=crops, return_tensors="pt")["pixel_values"].float()

    def _crop_shape(self) -> Tuple[int, int, int]:
        """(3, H, W) of the image processor's output, found once by processing a blank image."""
        if getattr(self, "_crop_shape_cache", None) is None:
            probe = self.image_processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")["pixel_values"]
            self._crop_shape_cache = tuple(int(v) for v in probe.shape[1:])
        return self._crop_shape_cache

    # ------------------------------------------------------------------------------------------
    # Labels
    # ------------------------------------------------------------------------------------------

    def _labels(self, checked, sample_ids, num_words, proposals, num_regions):
        """Gold entities as the loss takes them (docs/ARCHITECTURE.md `labels`; docs/DESIGN.md §5): an
        entity's regions are the proposals with IoU >= `region_iou_threshold` with any of its gold
        boxes, or only column 0 when there is none; `uncovered` flags the entities with gold boxes that
        no proposal covers (the loss leaves them out of the region term by default)."""
        labels = []
        for index, entities in enumerate(checked):
            starts, ends, types, regions, uncovered = [], [], [], [], []
            for start, end, _, type_id, gold_boxes in entities:
                if end >= num_words[index]:
                    continue  # cut by truncation; counted in the truncation warning
                row = torch.zeros(num_regions + 1, dtype=torch.bool)
                for slot, proposal in enumerate(proposals[index]):
                    if any(box_iou(proposal, gold) >= self.region_iou_threshold for gold in gold_boxes):
                        row[slot + 1] = True
                uncovered.append(bool(gold_boxes) and not row.any())
                if not row.any():
                    row[0] = True
                starts.append(start)
                ends.append(end)
                types.append(type_id)
                regions.append(row)
            label = {
                "start": torch.tensor(starts, dtype=torch.long),
                "end": torch.tensor(ends, dtype=torch.long),
                "type": torch.tensor(types, dtype=torch.long),
                "regions": torch.stack(regions) if regions else torch.zeros((0, num_regions + 1), dtype=torch.bool),
                "uncovered": torch.tensor(uncovered, dtype=torch.bool),
            }
            if sample_ids is not None:
                label["id"] = str(sample_ids[index])
            labels.append(label)
        return labels

    def _check_entity(self, name, number, entity, num_words):
        """Validate one gold entity; returns `(start, end, type name, type id, gold boxes)`."""
        parsed = parse_entity(entity, f"sample {name}, entity {number}", num_words=num_words,
                              entity_types=self.entity_types)
        type_name = parsed["type"]
        return parsed["start"], parsed["end"], type_name, self.entity_types.index(type_name), parsed["boxes"]

    # ------------------------------------------------------------------------------------------
    # Post-processing
    # ------------------------------------------------------------------------------------------

    def post_process_grounded_ner(self, outputs, inputs, config, threshold=None) -> List[List[Dict[str, Any]]]:
        """Model outputs → per tweet a list of entities (docs/DESIGN.md §7).

        Args:
            outputs: `MQSPNOutput` of the model on `inputs`.
            inputs: what this processor returned for the tweets.
            config: the model's config (`model.config`): `entity_types`, `existence_threshold` and
                `max_span_words` decide what is decoded.
            threshold: existence threshold on P^c (default: the config's `existence_threshold`).

        Returns:
            per tweet a list of `{"text", "type", "start", "end" (word indices, inclusive),
            "char_start", "char_end" (raw-string input only; `text[char_start:char_end]`), "box"
            (pixel `[x1, y1, x2, y2]` of the chosen proposal, or None), "score", "region_score"}`.
        """
        if "words" not in inputs:
            raise KeyError("inputs lack 'words': pass the MQSPNProcessor output the model was run on")
        predictions = decode_predictions(outputs, config, inputs["word_mask"], inputs["region_mask"], threshold)
        region_boxes = inputs["region_boxes"].detach().cpu()
        region_mask = inputs["region_mask"].detach().cpu()
        offsets = inputs["word_offsets"].detach().cpu() if "word_offsets" in inputs else None
        results = []
        for index, tweet in enumerate(predictions):
            entities = []
            for prediction in tweet:
                start, end, region = int(prediction["start"]), int(prediction["end"]), int(prediction["region"])
                if offsets is not None:
                    char_start, char_end = int(offsets[index, start, 0]), int(offsets[index, end, 1])
                    entity = {"text": inputs["text"][index][char_start:char_end], "type": prediction["type"],
                              "start": start, "end": end, "char_start": char_start, "char_end": char_end}
                else:
                    entity = {"text": " ".join(inputs["words"][index][start : end + 1]), "type": prediction["type"],
                              "start": start, "end": end}
                if region > 0:
                    if not bool(region_mask[index, region - 1]):
                        raise ValueError(f"tweet {index}: decoded region {region} is a padding slot")
                    entity["box"] = [float(v) for v in region_boxes[index, region - 1]]
                else:
                    entity["box"] = None
                entity["score"] = float(prediction["score"])
                entity["region_score"] = float(prediction["region_score"])
                entities.append(entity)
            results.append(entities)
        return results
