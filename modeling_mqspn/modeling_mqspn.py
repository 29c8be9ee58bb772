"""MQSPN (Tang et al., AAAI 2025): multi-grained query-guided set prediction network for Grounded
Multimodal Named Entity Recognition, as a Hugging Face `PreTrainedModel`.

The parts follow the paper's §"Our Method" and ``docs/DESIGN.md`` §1-5:

* feature extraction: a BERT text encoder whose sub-word states are pooled into word states H_T, and a
  frozen CLIP vision tower whose pooled output encodes each proposal crop; the ungroundable token
  v_[ug] (the tower on a blank image) is prepended, so region index 0 means "no region";
* the multi-grained query set (MQS, Eqs. 1-2): learnable entity-grained queries (LEQ) plus the
  prompt-based type-grained queries (PTQ) tiled over the u queries;
* the query-guided fusion net (QFNet, Eqs. 3-4) × L: query-text cross-attention (QCT), query-region
  prefix integration (QPI) and the similarity-aware aggregator (SAG);
* the multimodal set prediction heads (MSP, Eqs. 5-8) and the bipartite matching loss (Eqs. 9-10, in
  ``matching_mqspn.py``).
"""

import copy
import math
import os
from dataclasses import dataclass

import torch
from PIL import Image
from safetensors import SafetensorError
from torch import nn
from torch.nn import functional as F
from transformers import BertModel, CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_mqspn import MQSPNConfig
from .interface_mqspn import METADATA_NAMES, boundary_probabilities, masked_fill_logits, masked_logit_value
from .matching_mqspn import MQSPNLoss

__all__ = [
    "BLANK_IMAGE_COLOR",
    "BLANK_IMAGE_SIZE",
    "EntityClassificationHead",
    "MQSPNAttention",
    "MQSPNFeedForward",
    "MQSPNForGroundedNER",
    "MQSPNFusionLayer",
    "MQSPNOutput",
    "ORDINALS",
    "QueryRegionPrefixIntegration",
    "QueryTextCrossAttention",
    "RegionMatchingHead",
    "SimilarityAwareAggregator",
    "SpanBoundaryHead",
    "attention_bias",
    "ordinal_word",
    "sinusoidal_slot_code",
    "word_tag_targets",
]

# The blank image whose vision-tower encoding is the ungroundable token v_[ug] (paper §"Feature
# Extraction Module"): a white square, resized by the CLIP image processor like any crop.
BLANK_IMAGE_SIZE = 224
BLANK_IMAGE_COLOR = (255, 255, 255)

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
            "eighteenth", "nineteenth", "twentieth")


def ordinal_word(index):
    """The English ordinal of the 0-based `index` ("first", ...), "number 21" beyond the list."""
    return ORDINALS[index] if index < len(ORDINALS) else f"number {index + 1}"


def attention_bias(key_mask, dtype):
    """(B, L_k) bool → additive (B, 1, 1, L_k) bias; a row with every key masked becomes uniform, not NaN."""
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    return bias.masked_fill(~key_mask, torch.finfo(dtype).min)[:, None, None, :]


def sinusoidal_slot_code(num_slots, width, device=None, dtype=torch.float32):
    """(num_slots, width) fixed transformer-style sinusoidal codes of the slot indices, root-mean-square 1:
    sin / cos of i / 10000^(2k/width). Pairwise distinct for distinct i (the first pair is (sin i, cos i))."""
    position = torch.arange(num_slots, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(
        torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / max(width, 1))
    )
    code = torch.zeros(num_slots, width, device=device, dtype=torch.float32)
    code[:, 0::2] = torch.sin(position * frequency)
    code[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return (code * math.sqrt(2.0)).to(dtype)


def word_tag_targets(labels, word_mask, num_types):
    """BIO tags (B, n) long of the gold spans in ``labels`` (inclusive word indices): 0 is O, 1 + 2t begins an
    entity of type t, 2 + 2t continues one. The targets of the auxiliary word-tagging loss."""
    tags = torch.zeros(word_mask.shape, dtype=torch.long)
    for row, tweet in enumerate(labels):
        for start, end, kind in zip(tweet["start"].tolist(), tweet["end"].tolist(), tweet["type"].tolist()):
            if not 0 <= kind < num_types:
                raise ValueError(f"Batch index {row}: entity type {kind} is outside 0..{num_types - 1}.")
            tags[row, start] = 1 + 2 * kind
            tags[row, start + 1 : end + 1] = 2 + 2 * kind
    return tags.to(word_mask.device, non_blocking=True)


@dataclass
class MQSPNOutput(ModelOutput):
    r"""
    Output of [`MQSPNForGroundedNER`]. Probabilities are the sigmoid of the logits (softmax over the last axis
    for `class_logits`); masked words and regions hold a large negative logit.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            The bipartite matching loss (paper Eq. 10), summed over the QFNet layers when auxiliary losses are on,
            plus `config.word_tagging_loss_weight` times the word-tagging loss when that is above 0.
        loss_dict (`dict[str, torch.FloatTensor]`, *optional*, returned when `labels` are given):
            The named scalar parts of `loss`, as returned by `MQSPNLoss`, and `loss_tagging` (unweighted) when
            the word-tagging loss is on.
        existence_logits (`torch.FloatTensor` of shape `(batch_size, num_queries)`, *optional*):
            Existence head (paper Eq. 8): the logit of P^c, whether query i found an entity of its type
            `query_types[i]`. Present in `head_mode="existence"`.
        class_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_entity_types + 1)`, *optional*):
            Softmax head logits; class 0 is ∅ (no entity), class t + 1 is `config.entity_types[t]`. Present in
            `head_mode="softmax"`.
        start_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_words)`):
            Span start logits (paper Eq. 6, P^s).
        end_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_words)`):
            Span end logits (P^e).
        region_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_regions + 1)`):
            Region logits (paper Eq. 7, P^r); column 0 is the ungroundable token ("no region"), column j the
            j-th proposal.
        query_types (`torch.LongTensor` of shape `(num_queries,)`):
            The entity type index of each query, i mod p.
        aux_outputs (`list[dict[str, torch.FloatTensor]]`, *optional*):
            For each QFNet layer before the last, a dict with the same logits keys as above
            (`existence_logits` or `class_logits`, `start_logits`, `end_logits`, `region_logits`). `None` when
            `config.use_auxiliary_loss` is False, and at inference (no `labels`) unless
            `output_auxiliary_outputs=True`: only the last layer is decoded, so the heads run on it alone.
        query_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_queries, hidden_size)`):
            The queries after the last QFNet layer, Ĥ_Q.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict | None = None
    existence_logits: torch.FloatTensor | None = None
    class_logits: torch.FloatTensor | None = None
    start_logits: torch.FloatTensor | None = None
    end_logits: torch.FloatTensor | None = None
    region_logits: torch.FloatTensor | None = None
    query_types: torch.LongTensor | None = None
    aux_outputs: list | None = None
    query_hidden_states: torch.FloatTensor | None = None


class MQSPNAttention(nn.Module):
    """Multi-head attention whose keys/values may be prefixed with extra keys/values (prefix tuning)."""

    def __init__(self, hidden_size, num_heads, dropout):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        # No key bias: it adds the same score to every key of a query, which the softmax cancels.
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _split_heads(self, states):
        batch_size, length, _ = states.shape
        return states.view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, key_value_states, key_mask, prefix_keys=None, prefix_values=None, prefix_mask=None):
        """
        hidden_states (B, L_q, h) attend to key_value_states (B, L_k, h) where key_mask (B, L_k) is True, and,
        when given, to the already projected prefix_keys / prefix_values (B, L_p, h) where prefix_mask is True.
        """
        query = self._split_heads(self.q_proj(hidden_states))  # (B, heads, L_q, d)
        key = self._split_heads(self.k_proj(key_value_states))  # (B, heads, L_k, d)
        value = self._split_heads(self.v_proj(key_value_states))
        if prefix_keys is not None:
            key = torch.cat([self._split_heads(prefix_keys), key], dim=2)  # (B, heads, L_p + L_k, d)
            value = torch.cat([self._split_heads(prefix_values), value], dim=2)
            key_mask = torch.cat([prefix_mask, key_mask], dim=1)
        context = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_bias(key_mask, query.dtype),
            dropout_p=self.dropout if self.training else 0.0,
        )
        batch_size, _, length, _ = context.shape
        return self.out_proj(context.transpose(1, 2).reshape(batch_size, length, -1))


class MQSPNFeedForward(nn.Module):
    """Position-wise feed-forward sub-layer (Linear, GELU, Linear) of the QFNet blocks."""

    def __init__(self, hidden_size, intermediate_size, dropout):
        super().__init__()
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.output = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states):
        return self.output(self.dropout(F.gelu(self.intermediate(hidden_states))))


class QueryTextCrossAttention(nn.Module):
    """QCT (paper §"Query-guided Fusion Net", Fig. 2b): a post-LN transformer decoder block for the queries —
    self-attention among the queries, cross-attention from the queries to the words (padding masked), FFN.
    Table 3 "w/o QCT" (`use_query_text_attention=False`) removes the cross-attention sub-layer."""

    def __init__(self, config):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        eps = config.text_config.layer_norm_eps
        self.self_attention = MQSPNAttention(hidden_size, config.fusion_num_heads, config.fusion_dropout)
        self.self_attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        if config.use_query_text_attention:
            self.cross_attention = MQSPNAttention(hidden_size, config.fusion_num_heads, config.fusion_dropout)
            self.cross_attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        else:
            self.cross_attention = None
        self.feed_forward = MQSPNFeedForward(hidden_size, config.fusion_intermediate_size, config.fusion_dropout)
        self.feed_forward_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(config.fusion_dropout)

    def forward(self, queries, words, word_mask):
        """queries (B, u, h), words (B, n, h), word_mask (B, n) bool → H̃_Q (B, u, h)."""
        all_queries = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        attended = self.self_attention(queries, queries, all_queries)
        queries = self.self_attention_norm(queries + self.dropout(attended))
        if self.cross_attention is not None:
            attended = self.cross_attention(queries, words, word_mask)
            queries = self.cross_attention_norm(queries + self.dropout(attended))
        return self.feed_forward_norm(queries + self.dropout(self.feed_forward(queries)))


class QueryRegionPrefixIntegration(nn.Module):
    """QPI (paper §"Query-guided Fusion Net" and its appendix; docs/DESIGN.md §3): a post-LN transformer block for the
    regions whose attention is Attn(Q_V, [K_P; K_V], [V_P; V_V]) — the prefix's keys and values prepended to
    the regions' own, as prefix tuning in MKGformer — with padding regions masked. The prefix P is the queries
    H̃_Q (`prefix_source="queries"`, the paper) or the words H_T (`"text"`, the authors' code); it has its own
    key and value projections. Table 3 "w/o QPI" (`use_prefix_integration=False`) leaves plain region
    self-attention."""

    def __init__(self, config):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        eps = config.text_config.layer_norm_eps
        self.attention = MQSPNAttention(hidden_size, config.fusion_num_heads, config.fusion_dropout)
        if config.use_prefix_integration:
            self.prefix_key_proj = nn.Linear(hidden_size, hidden_size)
            self.prefix_value_proj = nn.Linear(hidden_size, hidden_size)
        else:
            self.prefix_key_proj = None
            self.prefix_value_proj = None
        self.attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.feed_forward = MQSPNFeedForward(hidden_size, config.fusion_intermediate_size, config.fusion_dropout)
        self.feed_forward_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(config.fusion_dropout)

    def forward(self, regions, region_mask, prefix_states, prefix_mask):
        """regions (B, k+1, h) with region_mask (B, k+1); prefix_states (B, L_p, h) with prefix_mask → H̃_V."""
        if self.prefix_key_proj is not None:
            attended = self.attention(
                regions,
                regions,
                region_mask,
                prefix_keys=self.prefix_key_proj(prefix_states),
                prefix_values=self.prefix_value_proj(prefix_states),
                prefix_mask=prefix_mask,
            )
        else:
            attended = self.attention(regions, regions, region_mask)
        regions = self.attention_norm(regions + self.dropout(attended))
        return self.feed_forward_norm(regions + self.dropout(self.feed_forward(regions)))


class SimilarityAwareAggregator(nn.Module):
    r"""SAG (paper Eqs. 3-4; docs/DESIGN.md §3). For query i, α^φ_j = softmax_j(H̃_φj · H̃_Qi / √h) over the words
    (φ = T) and the regions (φ = V), padding masked, and

        F(H̃_Qi) = tanh(H̃_Qi W1 + Σ_φ λ_φ Σ_j α^φ_j H̃_φj) W2 + b,   λ_V = λ, λ_T = 1 − λ.

    The 1/√h scale is ours (the unscaled dot product saturates the softmax at h = 768). The layer returns
    LayerNorm(H̃_Q + F(H̃_Q)) when `config.aggregator_residual` (the default, chosen by measurement) and F(H̃_Q)
    otherwise (the paper read literally)."""

    def __init__(self, config):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.scale = 1.0 / math.sqrt(hidden_size)
        self.visual_weight = config.aggregator_lambda
        self.query_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # W1
        self.output_proj = nn.Linear(hidden_size, hidden_size)  # W2, b
        if config.aggregator_residual:
            self.norm = nn.LayerNorm(hidden_size, eps=config.text_config.layer_norm_eps)
            self.dropout = nn.Dropout(config.fusion_dropout)
        else:
            self.norm = None

    def _similarity_context(self, queries, states, mask):
        """Σ_j α_j H̃_j for every query: queries (B, u, h), states (B, L, h), mask (B, L) → (B, u, h)."""
        scores = torch.matmul(queries, states.transpose(1, 2)) * self.scale  # (B, u, L)
        scores = scores + attention_bias(mask, scores.dtype)[:, 0]
        return torch.matmul(scores.softmax(dim=-1), states)

    def forward(self, queries, words, word_mask, regions, region_mask):
        """queries H̃_Q (B, u, h), words H_T (B, n, h), regions H̃_V (B, k+1, h) → the new H_Q (B, u, h)."""
        context = (1.0 - self.visual_weight) * self._similarity_context(queries, words, word_mask)
        context = context + self.visual_weight * self._similarity_context(queries, regions, region_mask)
        aggregated = self.output_proj(torch.tanh(self.query_proj(queries) + context))
        if self.norm is None:
            return aggregated
        return self.norm(queries + self.dropout(aggregated))


class MQSPNFusionLayer(nn.Module):
    """One QFNet layer: QCT updates the queries, QPI the regions, SAG merges both into the queries."""

    def __init__(self, config):
        super().__init__()
        self.prefix_source = config.prefix_source
        self.query_text_attention = QueryTextCrossAttention(config)
        self.prefix_integration = QueryRegionPrefixIntegration(config)
        self.similarity_aggregator = SimilarityAwareAggregator(config) if config.use_similarity_aggregator else None

    def forward(self, queries, words, word_mask, regions, region_mask):
        """→ (queries (B, u, h), regions (B, k+1, h)) after this layer."""
        queries = self.query_text_attention(queries, words, word_mask)
        if self.prefix_source == "queries":
            prefix_states = queries
            prefix_mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        else:
            prefix_states, prefix_mask = words, word_mask
        regions = self.prefix_integration(regions, region_mask, prefix_states, prefix_mask)
        if self.similarity_aggregator is not None:
            queries = self.similarity_aggregator(queries, words, word_mask, regions, region_mask)
        return queries, regions


class SpanBoundaryHead(nn.Module):
    """Span boundary localisation (paper Eqs. 5-6): S^b = ReLU(Ĥ_Q W_Q^b ⊕ Ĥ_T W_T^b) broadcast to (u, n, h),
    P^s = σ(S^b w_s), P^e = σ(S^b w_e); padding words masked.

    S^b is built for the real words only, packed over the batch ((M, u, h) for the batch's M real words, not
    (B, u, n, h) with the padding words of every shorter tweet), with the ReLU in place and w_s, w_e applied
    as one (h → 2) projection: one pass over S^b forward and one backward instead of two. The logits are those
    of the broadcast over every word followed by the padding mask (docs/DESIGN.md §4; tests/test_speed_paths.py)."""

    def __init__(self, hidden_size):
        super().__init__()
        self.query_proj = nn.Linear(hidden_size, hidden_size)  # W_Q^b
        self.text_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # W_T^b
        self.start_proj = nn.Linear(hidden_size, 1)  # w_s
        self.end_proj = nn.Linear(hidden_size, 1)  # w_e

    def forward(self, queries, words, word_mask, projected_words=None, word_positions=None):
        """queries (B, u, h), words (B, n, h), word_mask (B, n) → start and end logits (B, u, n).
        ``projected_words`` is ``text_proj(words)`` when the caller already has it (the words are the same
        for every QFNet layer, so the model projects them once); ``word_positions`` the (batch, word) index
        pair of the real words, ``word_mask.nonzero(as_tuple=True)`` (the model reads it once per forward)."""
        if projected_words is None:
            projected_words = self.text_proj(words)
        if word_positions is None:
            word_positions = word_mask.nonzero(as_tuple=True)
        tweet, word = word_positions  # (M,) each
        batch_size, num_queries, _ = queries.shape
        joint = self.query_proj(queries).index_select(0, tweet)  # (M, u, h): the queries of each word's tweet
        joint = joint.add_(projected_words[tweet, word][:, None, :]).relu_()  # S^b of the real words
        weight = torch.cat([self.start_proj.weight, self.end_proj.weight])  # (2, h): w_s and w_e together
        bias = torch.cat([self.start_proj.bias, self.end_proj.bias])
        packed = F.linear(joint, weight, bias)  # (M, u, 2)
        logits = packed.new_full((batch_size, word_mask.shape[1], num_queries, 2), masked_logit_value(packed.dtype))
        logits = logits.index_put((tweet, word), packed)  # padding words keep the masked logit
        start_logits, end_logits = logits.permute(3, 0, 2, 1).contiguous().unbind(0)  # (B, u, n) each
        return start_logits, end_logits


class RegionMatchingHead(nn.Module):
    """Candidate regions matching (paper Eq. 7): S^r = ReLU(Ĥ_Q W_Q^r ⊕ Ĥ_V W_V^r), P^r = σ(S^r w_r) over the
    k + 1 regions (index 0 = ungroundable); padding regions masked."""

    def __init__(self, hidden_size):
        super().__init__()
        self.query_proj = nn.Linear(hidden_size, hidden_size)  # W_Q^r
        self.region_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # W_V^r
        self.score_proj = nn.Linear(hidden_size, 1)  # w_r

    def forward(self, queries, regions, region_mask):
        """queries (B, u, h), regions (B, k+1, h), region_mask (B, k+1) → region logits (B, u, k+1)."""
        joint = (self.query_proj(queries)[:, :, None, :] + self.region_proj(regions)[:, None, :, :]).relu_()
        return masked_fill_logits(self.score_proj(joint).squeeze(-1), region_mask[:, None, :])


class EntityClassificationHead(nn.Module):
    """Entity classification (paper Eq. 8): S^c = ReLU([Ĥ_Q W_Q^c ; P^s Ĥ_T ; P^e Ĥ_T ; P^r Ĥ_V]) (B, u, 4h) and
    P^c = σ(S^c w_c), the existence of an entity of the query's own type. In `head_mode="softmax"` w_c maps to
    p + 1 classes (∅ first) for a softmax instead (docs/DESIGN.md §4)."""

    def __init__(self, hidden_size, num_outputs, boundary_activation="sigmoid"):
        super().__init__()
        self.boundary_activation = boundary_activation
        self.query_proj = nn.Linear(hidden_size, hidden_size)  # W_Q^c
        self.classifier = nn.Linear(4 * hidden_size, num_outputs)  # w_c

    def forward(self, queries, words, regions, start_logits, end_logits, region_logits):
        """→ (B, u, num_outputs) logits; the probability-weighted sums are unnormalised, as in Eq. 8."""
        features = torch.cat(
            [
                self.query_proj(queries),
                torch.matmul(boundary_probabilities(start_logits, self.boundary_activation), words),  # P^s Ĥ_T (B, u, h)
                torch.matmul(boundary_probabilities(end_logits, self.boundary_activation), words),  # P^e Ĥ_T
                torch.matmul(region_logits.sigmoid(), regions),  # P^r Ĥ_V
            ],
            dim=-1,
        )
        return self.classifier(F.relu(features))


class MQSPNForGroundedNER(PreTrainedModel):
    r"""
    MQSPN for Grounded Multimodal Named Entity Recognition: from a tweet's words and its image's region
    proposals, predict a set of (start word, end word, type, region) quadruples, region 0 meaning "not
    groundable" (paper §"Overview").

    Build it with pretrained encoders through [`~MQSPNForGroundedNER.from_encoders`], which also computes the
    type-query and ungroundable-token buffers; a saved model then loads with `from_pretrained` alone.
    """

    config_class = MQSPNConfig
    base_model_prefix = "mqspn"
    main_input_name = "input_ids"
    _no_split_modules = ["MQSPNFusionLayer", "BertLayer", "CLIPEncoderLayer"]

    def __init__(self, config: MQSPNConfig):
        super().__init__(config)
        hidden_size = config.text_config.hidden_size
        vision_size = config.vision_config.hidden_size
        num_types = len(config.entity_types)

        self.text_encoder = BertModel(config.text_config, add_pooling_layer=False)
        if config.include_vision_tower:
            self.vision_model = CLIPVisionModel(config.vision_config)
        else:
            self.vision_model = None
        # v_[ug]: the frozen vision tower's pooled output on a blank image (D_v,), set by from_encoders.
        self.register_buffer("ungroundable_embedding", torch.zeros(vision_size), persistent=True)
        self.region_projection = nn.Linear(vision_size, hidden_size)
        self.region_norm = nn.LayerNorm(hidden_size, eps=config.text_config.layer_norm_eps)
        self.region_dropout = nn.Dropout(config.fusion_dropout)

        # MQS (Eqs. 1-2): PTQ H_Q^o (p, h) is a buffer computed from the untouched pretrained encoder;
        # LEQ H_Q^e (u, h) is learnable.
        self.register_buffer("type_queries", torch.zeros(num_types, hidden_size), persistent=True)
        if config.use_entity_queries:
            self.entity_queries = nn.Parameter(torch.zeros(config.num_queries, hidden_size))
        else:
            self.entity_queries = None
            # "w/o LEQ": one frozen human-designed query per slot (the [MASK] state of its own prompt), set by
            # from_encoders; a fixed sinusoidal slot code is added in multi_grained_queries.
            self.register_buffer("slot_queries", torch.zeros(config.num_queries, hidden_size), persistent=True)

        self.fusion_layers = nn.ModuleList([MQSPNFusionLayer(config) for _ in range(config.num_fusion_layers)])

        self.span_head = SpanBoundaryHead(hidden_size)
        self.region_head = RegionMatchingHead(hidden_size)
        num_class_outputs = 1 if config.head_mode == "existence" else num_types + 1
        self.classification_head = EntityClassificationHead(
            hidden_size, num_class_outputs, config.boundary_activation
        )
        # Not in the paper: an auxiliary BIO tagger on H_T, trained only (docs/DEVIATIONS.md, "Word-tagging loss").
        self.word_tagger = nn.Linear(hidden_size, 2 * num_types + 1) if config.word_tagging_loss_weight > 0 else None
        self.post_init()
        self.freeze_vision_tower()

    def _init_weights(self, module):
        """Initialise every module type this file adds (BERT and CLIP initialise their own). The learnable
        entity queries follow the paper's N(0, 0.02); the two buffers get N(0, σ) placeholders that
        `from_encoders` replaces with the PTQ and v_[ug] values."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MQSPNForGroundedNER):
            init.normal_(module.type_queries, mean=0.0, std=std)
            init.normal_(module.ungroundable_embedding, mean=0.0, std=std)
            if module.entity_queries is None:
                init.normal_(module.slot_queries, mean=0.0, std=std)
            if module.entity_queries is not None:
                init.normal_(module.entity_queries, mean=0.0, std=std)

    def freeze_vision_tower(self):
        """Freeze the vision tower (paper §"Implementation Details"): no gradients, always in eval mode. Frozen
        parameters stay out of DistributedDataParallel's reduction, so it needs no `find_unused_parameters`."""
        if self.vision_model is not None:
            self.vision_model.requires_grad_(False)
            self.vision_model.eval()

    def train(self, mode: bool = True):
        """Set training mode everywhere except the frozen vision tower, which always stays in eval mode."""
        super().train(mode)
        self.freeze_vision_tower()
        return self

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then re-freeze the vision tower: loading materialises fresh
        parameters, which would otherwise come back with `requires_grad=True`.

        A checkpoint whose config and weights disagree is refused with a `ValueError`: parameters of the
        model the config describes that the weights lack would stay randomly initialised, and weights the
        model has no place for would be ignored (only the vision tower's may be, with
        `include_vision_tower=False`). Differently shaped tensors are refused by transformers itself.
        Weights are read from safetensors only: a pickle (`pytorch_model.bin`) is never loaded."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("MQSPN loads safetensors weights only; pickled weights (use_safetensors=False) are refused")
        kwargs["use_safetensors"] = True
        output_loading_info = kwargs.pop("output_loading_info", False)
        source = str(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except SafetensorError as error:
            raise ValueError(
                f"checkpoint {source!r}: the weights file is not valid safetensors ({error}); a truncated copy or "
                "a file of another format (e.g. a pickle renamed model.safetensors)"
            ) from None
        model.freeze_vision_tower()
        missing = sorted(info.get("missing_keys") or [])
        unexpected = sorted(
            key for key in info.get("unexpected_keys") or []
            if model.config.include_vision_tower or not key.startswith("vision_model.")
        )
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} parameter(s) of the model its config describes are not in the weights "
                             f"(e.g. {missing[:3]})")
            if unexpected:
                parts.append(f"{len(unexpected)} weight(s) have no place in that model (e.g. {unexpected[:3]})")
            raise ValueError(
                f"checkpoint {source!r}: config.json and the weights disagree: " + "; ".join(parts)
                + ". Use the config.json saved with these weights (save_pretrained writes both)."
            )
        return (model, info) if output_loading_info else model

    @property
    def query_types(self):
        """(u,) long: the type index τ(i) of each query: i mod p (docs/DESIGN.md §2), or as `config.type_query_counts`
        deals them (`config.query_type_ids`)."""
        return torch.tensor(self.config.query_type_ids, dtype=torch.long, device=self.type_queries.device)

    @torch.no_grad()
    def encode_regions(self, pixel_values):
        """Run the frozen vision tower on a flat batch of crops: pixel_values (N, 3, H, W) → pooled (N, D_v)."""
        if self.vision_model is None:
            raise ValueError(
                "This MQSPN model was built with include_vision_tower=False and cannot encode pixel_values; "
                "pass precomputed region_features instead, or load a checkpoint that includes the vision tower."
            )
        pixel_values = pixel_values.to(device=self.ungroundable_embedding.device, dtype=self.vision_model.dtype)
        return self.vision_model(pixel_values=pixel_values).pooler_output

    def multi_grained_queries(self, batch_size):
        """H_Q = H_Q^e ⊕ [H_Q^o]^d (paper Eq. 2): LEQ plus the type queries tiled by τ(i) → (B, u, h). "w/o LEQ":
        the frozen per-slot queries (`fixed_slot_queries`)."""
        if not self.config.use_type_queries:
            queries = self.entity_queries
        elif self.entity_queries is None:
            queries = self.fixed_slot_queries()
        else:
            queries = self.entity_queries + self.scaled_type_queries()[self.query_types]
        return queries.unsqueeze(0).expand(batch_size, -1, -1)

    def scaled_type_queries(self):
        """The PTQ buffer rescaled to root-mean-square `config.type_query_rms` (one scalar for all types), or as
        it is when that is None → (p, h)."""
        if self.config.type_query_rms is None:
            return self.type_queries
        rms = self.type_queries.pow(2).mean().sqrt().clamp_min(torch.finfo(self.type_queries.dtype).tiny)
        return self.type_queries * (self.config.type_query_rms / rms)

    def fixed_slot_queries(self):
        """The "w/o LEQ" queries (u, h), none of them learned: each slot's prompt [MASK] state (`slot_queries`,
        MNER-QG-style wording with the slot's ordinal) rescaled like the type queries, plus a fixed sinusoidal
        code of the slot index at the same root-mean-square, so that no two slots are equal even where the
        encoder maps two prompts alike (docs/DEVIATIONS.md, "Table 3 rows")."""
        states = self.slot_queries
        rms = self.config.type_query_rms
        if rms is not None:
            scale = states.pow(2).mean().sqrt().clamp_min(torch.finfo(states.dtype).tiny)
            states = states * (rms / scale)
        code = sinusoidal_slot_code(states.shape[0], states.shape[1], device=states.device, dtype=states.dtype)
        return states + code * (1.0 if rms is None else rms)

    def word_index(self, input_ids, word_ids, word_mask):
        """Validate ``word_ids`` against ``word_mask`` and map each sub-word to its word → (index (B, S) long with
        special and padding tokens at the dump slot n, sub-word counts (B, n) float, the real words' positions
        ``word_mask.nonzero(as_tuple=True)`` for the span head).

        Runs before the text encoder, with one host-device synchronisation for both checks and the positions
        (while the device's queue is still short); the detailed error is worked out only when a check fails."""
        batch_size = word_ids.shape[0]
        num_words = word_mask.shape[1]
        if word_ids.shape != input_ids.shape:
            raise ValueError(f"word_ids has shape {tuple(word_ids.shape)} but input_ids {tuple(input_ids.shape)}.")
        too_far = word_ids >= num_words
        # Sub-words of special and padding tokens (word id -1) go to a dump slot at index n.
        index = torch.where((word_ids >= 0) & ~too_far, word_ids, torch.full_like(word_ids, num_words))  # (B, S)
        counts = torch.zeros(batch_size, num_words + 1, device=index.device).scatter_add_(
            1, index, torch.ones_like(index, dtype=torch.float)
        )[:, :num_words]
        missing = word_mask & (counts == 0)
        # The one synchronisation: nonzero's length reaches the host. A failed check appends B·n + 1 hits, more
        # than word_mask can hold, so that the same length also says whether to raise.
        flat_mask = word_mask.reshape(-1)
        failed = (too_far.any() | missing.any()).expand(flat_mask.numel() + 1)
        hits = torch.cat([flat_mask, failed]).nonzero().squeeze(1)
        if hits.numel() > flat_mask.numel():
            if bool(too_far.any()):
                bad = sorted({int(b) for b in too_far.nonzero()[:, 0]})
                raise ValueError(
                    f"Samples {bad} of the batch have word_ids >= {num_words}, the width of word_mask: word_mask "
                    "must have one column per word of the longest tweet."
                )
            pairs = [(int(b), int(w)) for b, w in missing.nonzero()[:5]]
            raise ValueError(
                f"{int(missing.sum())} words have no sub-word token (batch index, word index: {pairs}); the "
                "processor must map such words to the tokenizer's unknown token."
            )
        return index, counts, (hits // num_words, hits % num_words)

    def encode_words(self, input_ids, attention_mask, word_ids, word_mask, token_type_ids=None, word_index=None):
        """Text encoder, then each word's vector pooled from its sub-words (`config.word_pooling`) → (B, n, h).
        ``word_index``: ``self.word_index(...)``'s result when the caller has it."""
        index, counts, _ = self.word_index(input_ids, word_ids, word_mask) if word_index is None else word_index
        token_states = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, S, h)
        batch_size, seq_len, hidden_size = token_states.shape
        num_words = word_mask.shape[1]
        if self.config.word_pooling == "first":
            positions = torch.arange(seq_len, device=index.device).expand(batch_size, -1)
            first = torch.full((batch_size, num_words + 1), seq_len - 1, device=index.device, dtype=torch.long)
            first = first.scatter_reduce(1, index, positions, reduce="amin", include_self=True)[:, :num_words]
            pooled = token_states.gather(1, first[..., None].expand(-1, -1, hidden_size))  # (B, n, h)
            return pooled.masked_fill((counts == 0)[..., None], 0.0)  # padding words are zero, as with max/mean
        reduce = "amax" if self.config.word_pooling == "max" else "mean"
        pooled = token_states.new_zeros(batch_size, num_words + 1, hidden_size).scatter_reduce(
            1, index[..., None].expand(-1, -1, hidden_size), token_states, reduce=reduce, include_self=False
        )
        return pooled[:, :num_words]

    def _region_features(self, batch_size, pixel_values, region_features, region_mask):
        """→ (features (B, K, D_v), region_mask (B, K) bool) from exactly one source, or empty when K = 0."""
        device = self.ungroundable_embedding.device
        if pixel_values is not None and region_features is not None:
            raise ValueError("Pass either pixel_values or region_features, not both.")
        if pixel_values is not None:
            num_regions = pixel_values.shape[1]
        elif region_features is not None:
            num_regions = region_features.shape[1]
        else:
            num_regions = 0 if region_mask is None else region_mask.shape[1]
            if num_regions and bool(region_mask.any()):
                raise ValueError(
                    "region_mask marks proposals but neither pixel_values nor region_features was given."
                )
        if region_mask is None:
            if num_regions:
                raise ValueError("region_mask is required when the batch has proposals (K > 0).")
            region_mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        region_mask = region_mask.to(device=device, dtype=torch.bool)
        if region_mask.shape != (batch_size, num_regions):
            raise ValueError(
                f"region_mask has shape {tuple(region_mask.shape)}; expected ({batch_size}, {num_regions}) to "
                "match the proposals' axis."
            )
        vision_size = self.ungroundable_embedding.shape[0]
        dtype = self.region_projection.weight.dtype
        if pixel_values is not None:
            features = torch.zeros(batch_size, num_regions, vision_size, device=device, dtype=dtype)
            if bool(region_mask.any()):
                # Encode only the real crops; padding slots stay zero and are masked downstream.
                features[region_mask] = self.encode_regions(pixel_values.to(device)[region_mask]).to(dtype)
        elif region_features is not None:
            if region_features.shape[-1] != vision_size:
                raise ValueError(
                    f"region_features have width {region_features.shape[-1]} but the vision tower's is "
                    f"{vision_size} (config.vision_config.hidden_size)."
                )
            features = region_features.to(device=device, dtype=dtype)
        else:
            features = torch.zeros(batch_size, 0, vision_size, device=device, dtype=dtype)
        return features, region_mask

    def _predict(self, queries, words, word_mask, regions, region_mask, projected_words=None, word_positions=None):
        """The MSP heads on one layer's states → dict of logits (docs/DESIGN.md §4)."""
        start_logits, end_logits = self.span_head(queries, words, word_mask, projected_words, word_positions)
        region_logits = self.region_head(queries, regions, region_mask)
        class_logits = self.classification_head(queries, words, regions, start_logits, end_logits, region_logits)
        prediction = {"start_logits": start_logits, "end_logits": end_logits, "region_logits": region_logits}
        if self.config.head_mode == "existence":
            prediction["existence_logits"] = class_logits.squeeze(-1)  # (B, u)
        else:
            prediction["class_logits"] = class_logits  # (B, u, p + 1)
        return prediction

    def forward(
        self,
        input_ids,
        attention_mask,
        word_ids,
        word_mask,
        token_type_ids=None,
        pixel_values=None,
        region_features=None,
        region_mask=None,
        labels=None,
        output_auxiliary_outputs=None,
        **processor_metadata,
    ) -> MQSPNOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, S)`): sub-word ids, `[CLS] ... [SEP]`, right-padded.
            attention_mask (`torch.LongTensor` of shape `(B, S)`): 1 for real sub-words.
            word_ids (`torch.LongTensor` of shape `(B, S)`): the word each sub-word belongs to, −1 for special
                and padding tokens.
            word_mask (`torch.BoolTensor` of shape `(B, n)`): 1 for real words.
            token_type_ids (`torch.LongTensor` of shape `(B, S)`, *optional*).
            pixel_values (`torch.FloatTensor` of shape `(B, K, 3, H, W)`, *optional*): proposal crops for the
                frozen vision tower.
            region_features (`torch.FloatTensor` of shape `(B, K, D_v)`, *optional*): precomputed pooled tower
                outputs of the crops, instead of `pixel_values`.
            region_mask (`torch.BoolTensor` of shape `(B, K)`, *optional*): 1 for real proposals; K may be 0.
            labels (`list[dict]`, *optional*): per tweet `start`, `end`, `type` (m,) long and `regions`
                (m, K + 1) bool, optionally `id`; see docs/ARCHITECTURE.md. With labels, `loss` is returned.
            output_auxiliary_outputs (`bool`, *optional*): return the earlier QFNet layers' logits
                (`aux_outputs`, with `config.use_auxiliary_loss`) without labels too. By default they are
                computed only when `labels` are given (the auxiliary loss needs them); inference runs the heads
                on the last layer alone.
            processor_metadata: the post-processing keys of `MQSPNProcessor`'s output (`region_boxes`,
                `image_sizes`, `words`, `text`, `word_offsets`), accepted and ignored; any other keyword is an error.
        """
        unexpected = sorted(set(processor_metadata) - set(METADATA_NAMES))
        if unexpected:
            raise TypeError(f"MQSPNForGroundedNER.forward() got unexpected keyword arguments {unexpected}.")
        word_mask = word_mask.to(torch.bool)
        batch_size = input_ids.shape[0]
        # Regions first: their checks synchronise with the device while its queue is still short.
        features, region_mask = self._region_features(batch_size, pixel_values, region_features, region_mask)
        word_index = self.word_index(input_ids, word_ids, word_mask)
        word_positions = word_index[2]  # the real words, packed by the span head
        words = self.encode_words(input_ids, attention_mask, word_ids, word_mask, token_type_ids, word_index)  # H_T
        ungroundable = self.ungroundable_embedding.to(features.dtype).expand(batch_size, 1, -1)
        regions = self.region_projection(torch.cat([ungroundable, features], dim=1))  # H_V (B, K+1, h)
        regions = self.region_dropout(self.region_norm(regions))
        full_region_mask = torch.cat([region_mask.new_ones(batch_size, 1), region_mask], dim=1)  # (B, K+1)

        queries = self.multi_grained_queries(batch_size).to(words.dtype)  # H_Q (B, u, h)
        with_aux = self.config.use_auxiliary_loss and (labels is not None or bool(output_auxiliary_outputs))
        projected_words = self.span_head.text_proj(words)  # W_T^b H_T: the same for every layer
        layers = []
        for index, layer in enumerate(self.fusion_layers):
            queries, regions = layer(queries, words, word_mask, regions, full_region_mask)
            if with_aux or index == len(self.fusion_layers) - 1:
                layers.append(
                    self._predict(queries, words, word_mask, regions, full_region_mask, projected_words, word_positions)
                )

        query_types = self.query_types
        loss = loss_dict = None
        if labels is not None:
            loss, loss_dict = MQSPNLoss(self.config)(layers, labels, word_mask, region_mask, query_types)
            if self.word_tagger is not None:
                tags = word_tag_targets(labels, word_mask, len(self.config.entity_types))
                loss_tagging = F.cross_entropy(self.word_tagger(words[word_mask]).float(), tags[word_mask])
                loss = loss + self.config.word_tagging_loss_weight * loss_tagging
                loss_dict["loss_tagging"] = loss_tagging.detach()
                loss_dict["loss"] = loss.detach()
        final = layers[-1]
        return MQSPNOutput(
            loss=loss,
            loss_dict=loss_dict,
            existence_logits=final.get("existence_logits"),
            class_logits=final.get("class_logits"),
            start_logits=final["start_logits"],
            end_logits=final["end_logits"],
            region_logits=final["region_logits"],
            query_types=query_types,
            aux_outputs=layers[:-1] if with_aux else None,
            query_hidden_states=queries,
        )

    @staticmethod
    @torch.no_grad()
    def prompt_type_queries(text_encoder, tokenizer, config):
        """The prompt-based type-grained queries H_Q^o (paper Eq. 1): for each type, the state at the mask
        position of `config.prompt_template` filled with the type's verbaliser, through `text_encoder` in eval
        mode → (p, h)."""
        if tokenizer.mask_token is None:
            raise ValueError(f"The tokenizer {type(tokenizer).__name__} has no mask token; PTQ needs one.")
        prompts = [config.prompt_template.format(word, mask=tokenizer.mask_token) for word in config.type_verbalizers]
        return MQSPNForGroundedNER.mask_states(text_encoder, tokenizer, prompts)

    @staticmethod
    @torch.no_grad()
    def slot_prompt_queries(text_encoder, tokenizer, config):
        """The "w/o LEQ" slot prompts' [MASK] states (u, h): slot i, the j-th query of type τ(i), reads
        `config.slot_prompt_template` with the type's verbaliser and ordinal j (e.g. "second person entity in
        the sentence is [MASK].")."""
        if tokenizer.mask_token is None:
            raise ValueError(f"The tokenizer {type(tokenizer).__name__} has no mask token; the slot prompts need one.")
        seen, prompts = {}, []
        for type_id in config.query_type_ids:
            ordinal = seen.get(type_id, 0)
            seen[type_id] = ordinal + 1
            prompts.append(config.slot_prompt_template.format(
                config.type_verbalizers[type_id], ordinal=ordinal_word(ordinal), mask=tokenizer.mask_token
            ))
        return MQSPNForGroundedNER.mask_states(text_encoder, tokenizer, prompts)

    @staticmethod
    @torch.no_grad()
    def mask_states(text_encoder, tokenizer, prompts):
        """The output state at the single mask token of each prompt, through `text_encoder` in eval mode → (N, h)."""
        encoded = tokenizer(prompts, padding=True, return_tensors="pt").to(text_encoder.device)
        is_mask = encoded["input_ids"] == tokenizer.mask_token_id  # (p, S)
        for prompt, count in zip(prompts, is_mask.sum(dim=1).tolist()):
            if count != 1:
                raise ValueError(f"The PTQ prompt {prompt!r} holds {count} mask tokens after tokenisation; expected 1.")
        was_training = text_encoder.training
        text_encoder.eval()
        states = text_encoder(**encoded).last_hidden_state  # (p, S, h)
        text_encoder.train(was_training)
        return states[is_mask]

    @staticmethod
    @torch.no_grad()
    def blank_image_embedding(vision_model, image_processor):
        """The ungroundable token v_[ug]: the vision tower's pooled output on a blank (white) image put through
        the CLIP image processor → (D_v,)."""
        blank = Image.new("RGB", (BLANK_IMAGE_SIZE, BLANK_IMAGE_SIZE), BLANK_IMAGE_COLOR)
        pixel_values = image_processor(images=blank, return_tensors="pt")["pixel_values"]
        was_training = vision_model.training
        vision_model.eval()
        pooled = vision_model(pixel_values=pixel_values.to(vision_model.device, vision_model.dtype)).pooler_output
        vision_model.train(was_training)
        return pooled[0]

    @classmethod
    def from_encoders(
        cls,
        text_name_or_path=None,
        vision_name_or_path=None,
        config=None,
        tokenizer=None,
        return_preprocessors=False,
        **config_kwargs,
    ):
        r"""
        Build an MQSPN model around its encoders (docs/DESIGN.md §1–2), e.g.
        `MQSPNForGroundedNER.from_encoders("bert-base-cased", "openai/clip-vit-base-patch32")`. This is the one
        construction path: `examples/train.py` builds every new model through it.

        A name or folder loads that pretrained encoder (`BertModel` and its tokenizer; `CLIPVisionModel` and
        `CLIPImageProcessor` from a CLIP vision or full CLIP checkpoint) and copies its weights in; `None` leaves
        the encoder randomly initialised from the config's `text_config` / `vision_config` (tiny models for tests
        and the demo). A random text encoder needs `tokenizer` (a name or folder; its vocabulary sets
        `vocab_size`); a random tower gets a CLIP image processor sized to its `image_size`. Then the type-query
        buffer (the [MASK] states of the PTQ prompts through the untouched text encoder) and the ungroundable
        token (the tower on a blank image) are computed, so the saved model loads with `from_pretrained` alone.

        The MQSPN fields come from `config` (or the defaults) updated with `config_kwargs`; a pretrained
        encoder's config replaces `text_config` / `vision_config`, and the fusion head count and FFN width are
        re-derived from a pretrained text encoder unless given in `config_kwargs`.

        With `return_preprocessors=True` the result is `(model, tokenizer, image_processor)`.
        """
        from transformers import AutoTokenizer, CLIPImageProcessor

        if text_name_or_path is None and tokenizer is None:
            raise ValueError(
                "a randomly initialised text encoder needs a tokenizer: pass tokenizer= (a tokenizer name or "
                "folder), or a pretrained text encoder"
            )
        fields = config.to_dict() if config is not None else {}
        for key in ("model_type", "transformers_version", "architectures", "auto_map", "custom_pipelines"):
            fields.pop(key, None)
        text_encoder = vision_model = image_processor = None
        if text_name_or_path is not None:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or text_name_or_path)
            text_encoder = BertModel.from_pretrained(text_name_or_path, add_pooling_layer=False)
            for derived in ("fusion_num_heads", "fusion_intermediate_size"):
                fields.pop(derived, None)
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if vision_name_or_path is not None:
            vision_model = CLIPVisionModel.from_pretrained(vision_name_or_path)
            image_processor = CLIPImageProcessor.from_pretrained(vision_name_or_path)
        fields.update(config_kwargs)
        if text_encoder is not None:
            fields["text_config"] = copy.deepcopy(text_encoder.config).to_dict()
        else:
            text_config = fields.get("text_config") or {}
            if not isinstance(text_config, dict):
                text_config = text_config.to_dict()
            fields["text_config"] = {**text_config, "vocab_size": len(tokenizer)}
        if vision_model is not None:
            fields["vision_config"] = copy.deepcopy(vision_model.config).to_dict()
        config = MQSPNConfig(**fields)
        if image_processor is None:
            side = config.vision_config.image_size
            image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

        model = cls(config)
        if text_encoder is not None:
            model.text_encoder.load_state_dict(text_encoder.state_dict())
        if vision_model is not None and model.vision_model is not None:
            model.vision_model.load_state_dict(vision_model.state_dict())
        tower = vision_model if vision_model is not None else model.vision_model
        if tower is None:
            tower = CLIPVisionModel(config.vision_config)  # a feature-only model: v_[ug] from a random tower
        with torch.no_grad():
            model.type_queries.copy_(cls.prompt_type_queries(text_encoder or model.text_encoder, tokenizer, config))
            if model.entity_queries is None:
                model.slot_queries.copy_(cls.slot_prompt_queries(text_encoder or model.text_encoder, tokenizer, config))
            model.ungroundable_embedding.copy_(cls.blank_image_embedding(tower, image_processor))
        return (model, tokenizer, image_processor) if return_preprocessors else model
