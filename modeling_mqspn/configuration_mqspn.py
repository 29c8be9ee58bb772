"""Configuration of MQSPN (Tang et al., AAAI 2025), the multi-grained query-guided set prediction
network for Grounded Multimodal Named Entity Recognition.

Every knob of ``docs/DESIGN.md`` is a field here; the defaults reproduce the paper (bert-base-cased text
encoder, frozen CLIP ViT-B/32 vision tower, u = 60 queries, k = 18 proposals, L = 3 QFNet layers).
"""

from transformers import BertConfig, CLIPVisionConfig, PretrainedConfig

__all__ = [
    "ABLATION_SWITCHES",
    "BOUNDARY_ACTIVATIONS",
    "DEFAULT_ENTITY_TYPES",
    "DEFAULT_EXISTENCE_THRESHOLD",
    "DEFAULT_MAX_REGIONS",
    "DEFAULT_MAX_SPAN_WORDS",
    "HEAD_MODES",
    "MQSPNConfig",
    "NULL_WEIGHT_NORMALIZATIONS",
    "PREFIX_SOURCES",
    "SPELLED_TYPES",
    "UNCOVERED_REGION_TARGETS",
    "WORD_POOLINGS",
    "default_type_verbalizers",
]

# The defaults every other module reads (the processor, the readers, the proposers, the scripts), defined once.
DEFAULT_ENTITY_TYPES = ("PER", "LOC", "ORG", "OTHER")  # Twitter-GMNER's label space
DEFAULT_MAX_REGIONS = 18  # k, VinVL's top-k proposals per image (paper)
DEFAULT_EXISTENCE_THRESHOLD = 0.5
DEFAULT_MAX_SPAN_WORDS = 10
# The PTQ words of the Twitter-GMNER types; any other type name reads as itself (default_type_verbalizers).
SPELLED_TYPES = {"PER": "person", "LOC": "location", "ORG": "organization", "OTHER": "other"}


def default_type_verbalizers(entity_types):
    """A type's word(s) in the PTQ prompt when none are given: the Twitter-GMNER names spelled out, any other
    type name in lower case with underscores as spaces (`"art_music"` -> `"art music"`; docs/DESIGN.md §2)."""
    return [SPELLED_TYPES.get(name, name.replace("_", " ").lower()) for name in entity_types]


HEAD_MODES = ("existence", "softmax")
NULL_WEIGHT_NORMALIZATIONS = ("weighted_mean", "entities")
UNCOVERED_REGION_TARGETS = ("ignore", "no_region")
WORD_POOLINGS = ("max", "first", "mean")
# How span-boundary logits become P^s / P^e (`boundary_activation`; interface_mqspn.boundary_probabilities).
BOUNDARY_ACTIVATIONS = ("sigmoid", "softmax")
PREFIX_SOURCES = ("queries", "text")
ABLATION_SWITCHES = (
    "use_type_queries",
    "use_entity_queries",
    "use_query_text_attention",
    "use_prefix_integration",
    "use_similarity_aggregator",
    "use_bipartite_matching",
)


class MQSPNConfig(PretrainedConfig):
    r"""
    Configuration of [`MQSPNForGroundedNER`].

    Args:
        text_config (`dict` or `BertConfig`, *optional*):
            The BERT-family text encoder (paper §"Feature Extraction Module"). Defaults to `BertConfig()`
            (the bert-base shape). Its `hidden_size` is the model width h.
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The frozen CLIP vision tower that encodes proposal crops; its `pooler_output` (width
            `vision_config.hidden_size`, D_v) is a region feature. Defaults to CLIP ViT-B/32.
        include_vision_tower (`bool`, *optional*, defaults to `True`):
            Build the vision tower inside the model so it accepts `pixel_values`. With `False` the
            model only accepts precomputed `region_features` (a feature-only checkpoint, about 88 M
            parameters lighter).
        entity_types (`list[str]`, *optional*, defaults to `["PER", "LOC", "ORG", "OTHER"]`):
            The label space; p = `len(entity_types)`.
        type_verbalizers (`list[str]`, *optional*, defaults to `default_type_verbalizers(entity_types)`):
            The word(s) put into the prompt of each type for its type-grained query (paper Eq. 1); by default
            `["person", "location", "organization", "other"]` for the Twitter-GMNER types.
        prompt_template (`str`, *optional*, defaults to `"{} is an entity type about {mask}."`):
            The prompt-based type-grained query (PTQ) template: `{}` receives the verbaliser and `{mask}`
            the tokenizer's mask token, whose output state is the type query (paper Eq. 1).
        num_queries (`int`, *optional*, defaults to 60):
            u, the number of multi-grained queries. Query i has type i mod p (paper Eq. 2 tiles the p type
            queries); when p does not divide u the first u mod p types get one query more, see
            `queries_per_type`. Must be at least p. With `type_query_counts` it is their sum.
        type_query_counts (`list[int]`, *optional*):
            How many queries each type owns, one count per entry of `entity_types` (each at least 1). `None`
            (the default) tiles the u queries over the types (query i has type i mod p). With counts the
            queries are dealt round-robin over the types that still have queries left (so equal counts give
            i mod p again) and `num_queries` must equal their sum (it is set to it when omitted). A tweet may
            hold at most `queries_per_type[t]` gold entities of type t in existence mode; `examples/train.py`
            sizes the counts from the training split with `"type_query_counts": "from_data"` in a recipe
            (docs/DEVIATIONS.md, "Per-type query counts").
        max_regions (`int`, *optional*, defaults to 18):
            k, the most proposals per image (VinVL top-k).
        num_fusion_layers (`int`, *optional*, defaults to 3):
            L, the number of QFNet layers.
        fusion_num_heads (`int`, *optional*):
            Attention heads of the QFNet blocks; defaults to the text encoder's head count.
        fusion_intermediate_size (`int`, *optional*):
            Feed-forward width of the QFNet blocks; defaults to 4h.
        fusion_dropout (`float`, *optional*, defaults to 0.1):
            Dropout inside the QFNet blocks.
        aggregator_lambda (`float`, *optional*, defaults to 0.5):
            λ_V of the similarity-aware aggregator (paper Eq. 4); λ_T = 1 − λ_V.
        aggregator_residual (`bool`, *optional*, defaults to `True`):
            The SAG layer output. `True`: H_Q ← LayerNorm(H̃_Q + F(H̃_Q)), the residual form of every other
            QFNet sub-layer. `False`: H_Q ← F(H̃_Q), the paper's Eq. 4 read literally. Chosen by measurement on
            the overfitting task of the tests (8 synthetic tweets, tiny model, 6 seeds, 2 and 3 layers): the
            residual form reaches GMNER F1 = 1.0 in 60-90 steps, the plain form in 100-300 or not within 400;
            see docs/DEVIATIONS.md.
        type_query_rms (`float`, *optional*, defaults to 0.02):
            The type-grained queries are rescaled (one scalar for all types, so their geometry is kept) to this
            root-mean-square before they are added to the entity-grained queries (Eq. 2). `None` adds the [MASK]
            states as they are, the paper read literally. Measured on the demo data (docs/INTEGRATION-NOTES.md):
            the [MASK] states are LayerNorm outputs of RMS ≈ 1, fifty times the N(0, 0.02) entity queries, so
            the queries of one type start near-identical and the set predictor never breaks the symmetry (no
            entity decoded after 150 steps); rescaled to the entity queries' scale, correct predictions come
            within 120 steps. See docs/DEVIATIONS.md.
        boundary_activation (`str`, *optional*, defaults to `"sigmoid"`):
            How the span head's start / end logits become P^s / P^e: `"sigmoid"`, an independent sigmoid per word
            trained with a binary cross-entropy over the tweet's words (the paper's Eq. 6), or `"softmax"`, one
            distribution over the words trained with a cross-entropy at the gold word (a pointer, as in
            machine-reading span extraction). docs/DEVIATIONS.md has the measurement.
        word_pooling (`str`, *optional*, defaults to `"max"`):
            How a word's vector is pooled from its sub-word states: `"max"` (authors' code), `"first"` or
            `"mean"`.
        prefix_source (`str`, *optional*, defaults to `"queries"`):
            Keys/values prepended to the regions' own in query-region prefix integration (QPI):
            `"queries"` (the paper) or `"text"` (the word states, as the authors' code does).
        head_mode (`str`, *optional*):
            The entity classification head of MSP: `"existence"` (paper Eq. 8, a sigmoid per query saying
            whether it found an entity of its own type) or `"softmax"` ((p+1)-way softmax over the types
            and ∅, the authors' code). `None` picks `"existence"`, also for "w/o PTQ", whose queries keep their
            type slot: the softmax head is its own switch (docs/DEVIATIONS.md, "Table 3 rows").
        use_type_queries (`bool`, *optional*, defaults to `True`):
            Table 3 "w/o PTQ" when `False`: the queries are the learnable entity queries alone (each keeps its type
            slot, so the existence head stays).
        use_entity_queries (`bool`, *optional*, defaults to `True`):
            Table 3 "w/o LEQ" when `False`: no learnable entity queries; each query slot is a frozen, human-designed
            query: the [MASK] state of its own prompt `slot_prompt_template` (the type's verbaliser and the slot's
            ordinal, MNER-QG-style) plus a fixed sinusoidal code of the slot index, both at `type_query_rms`, so
            that no two queries are equal (docs/DEVIATIONS.md, "Table 3 rows").
        use_query_text_attention (`bool`, *optional*, defaults to `True`):
            Table 3 "w/o QCT" when `False`: the query block has no cross-attention to the words.
        use_prefix_integration (`bool`, *optional*, defaults to `True`):
            Table 3 "w/o QPI" when `False`: the region block is plain self-attention, without a prefix.
        use_similarity_aggregator (`bool`, *optional*, defaults to `True`):
            Table 3 "w/o SAG" when `False`: no similarity-aware aggregator.
        use_bipartite_matching (`bool`, *optional*, defaults to `True`):
            Table 3 "w/o BML" when `False`: a fixed assignment of gold entities to queries (gold sorted by
            start, each to the next free query of its type) replaces the Hungarian matching.
        match_cost_class (`float`, *optional*, defaults to 1.0):
            Weight of the class / existence probability in the matching cost (paper Eq. 9).
        match_cost_start (`float`, *optional*, defaults to 1.0):
            Weight of the start probability in the matching cost.
        match_cost_end (`float`, *optional*, defaults to 1.0):
            Weight of the end probability in the matching cost.
        match_cost_region (`float`, *optional*, defaults to 1.0):
            Weight of the region probability in the matching cost.
        loss_weight_class (`float`, *optional*, defaults to 1.0):
            Weight of the existence BCE / class CE term of the loss (paper Eq. 10).
        loss_weight_span (`float`, *optional*, defaults to 1.0):
            Weight of the boundary terms (start + end BCE).
        loss_weight_region (`float`, *optional*, defaults to 1.0):
            Weight of the region BCE term.
        boundary_smoothing (`float`, *optional*, defaults to 0.0):
            Not in the paper; 0 = off (one-hot start / end targets). Above 0, boundary smoothing (Zhu and Li,
            ACL 2022): the gold word's target is 1 − ε and ε is shared equally by the valid words right beside
            it (one to each side), for the sigmoid and the pointer boundaries alike. The matching cost is
            unchanged. docs/DEVIATIONS.md, "Boundary smoothing".
        word_tagging_loss_weight (`float`, *optional*, defaults to 0.0):
            Not in the paper; 0 = off. Above 0, a linear BIO tagger on the text encoder's word states is trained
            beside the set loss with this weight (mean cross-entropy over the real words). It gives the encoder a
            loss at every word; decoding never reads it. docs/DEVIATIONS.md, "Word-tagging loss".
        slot_prompt_template (`str`, *optional*, defaults to `"{ordinal} {} entity in the sentence is {mask}."`):
            The per-slot prompt of the "w/o LEQ" queries: `{ordinal}` receives the slot's ordinal among the queries
            of its type (`"first"`, `"second"`, ...), `{}` the verbaliser, `{mask}` the mask token.
        null_weight_normalization (`str`, *optional*, defaults to `"weighted_mean"`):
            How the class / existence loss over all B·u queries is normalised. `"weighted_mean"` (DETR): the
            weighted mean over the queries, Σ w_i ℓ_i / Σ w_i with w = 1 for matched and `null_class_weight` for ∅
            queries, so the ∅ weight means the same in every batch. `"entities"`: Σ w_i ℓ_i divided by the number
            of gold entities (the earlier behaviour, under which a batch with few entities pushes harder towards
            ∅). docs/DEVIATIONS.md, "∅ normalisation".
        uncovered_region_target (`str`, *optional*, defaults to `"ignore"`):
            A groundable entity whose boxes no proposal covers (labels' `uncovered` flag): `"ignore"` leaves it out
            of the region loss and of the region term of the matching cost; `"no_region"` trains it towards the
            ungroundable token, the earlier behaviour.
        null_class_weight (`float`, *optional*, defaults to 0.1):
            Weight of the ∅ targets in the class / existence loss (the paper gives none, i.e. 1.0; 0.1 as
            DETR's `eos_coef`, chosen by measurement: docs/DEVIATIONS.md).
        use_auxiliary_loss (`bool`, *optional*, defaults to `True`):
            Run the MSP heads, the matching and the loss on every QFNet layer, not only on the last.
        gold_repeat (`int`, *optional*, defaults to 0):
            0 = off; else tile a tweet's gold entities up to this many targets (the authors' code: 45).
        existence_threshold (`float`, *optional*, defaults to 0.5):
            Decoding keeps a query whose P^c reaches this threshold (existence mode). `examples/train.py` calibrates
            it on dev after training and saves the chosen value in `best/config.json`.
        softmax_threshold (`float`, *optional*):
            Softmax head: decoding keeps a non-∅ argmax only when its probability reaches this; `None` keeps
            every non-∅ argmax. Calibrated on dev like `existence_threshold`.
        max_span_words (`int`, *optional*, defaults to 10):
            The longest span decoding may return, in words.
        initializer_range (`float`, *optional*, defaults to 0.02):
            σ of the N(0, σ) initialisation of the learnable entity queries (paper: N(0, 0.02)) and of the
            new layers.
    """

    model_type = "mqspn"
    sub_configs = {"text_config": BertConfig, "vision_config": CLIPVisionConfig}

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        include_vision_tower=True,
        entity_types=None,
        type_verbalizers=None,
        prompt_template="{} is an entity type about {mask}.",
        num_queries=60,
        type_query_counts=None,
        max_regions=DEFAULT_MAX_REGIONS,
        num_fusion_layers=3,
        fusion_num_heads=None,
        fusion_intermediate_size=None,
        fusion_dropout=0.1,
        aggregator_lambda=0.5,
        aggregator_residual=True,
        type_query_rms=0.02,
        word_pooling="max",
        boundary_activation="sigmoid",
        prefix_source="queries",
        head_mode=None,
        use_type_queries=True,
        use_entity_queries=True,
        use_query_text_attention=True,
        use_prefix_integration=True,
        use_similarity_aggregator=True,
        use_bipartite_matching=True,
        match_cost_class=1.0,
        match_cost_start=1.0,
        match_cost_end=1.0,
        match_cost_region=1.0,
        loss_weight_class=1.0,
        loss_weight_span=1.0,
        loss_weight_region=1.0,
        boundary_smoothing=0.0,
        word_tagging_loss_weight=0.0,
        slot_prompt_template="{ordinal} {} entity in the sentence is {mask}.",
        null_weight_normalization="weighted_mean",
        uncovered_region_target="ignore",
        null_class_weight=0.1,
        use_auxiliary_loss=True,
        gold_repeat=0,
        existence_threshold=DEFAULT_EXISTENCE_THRESHOLD,
        softmax_threshold=None,
        max_span_words=DEFAULT_MAX_SPAN_WORDS,
        initializer_range=0.02,
        **kwargs,
    ):
        if text_config is None:
            text_config = BertConfig()
        elif isinstance(text_config, dict):
            text_config = BertConfig(**text_config)
        if vision_config is None:
            vision_config = CLIPVisionConfig()
        elif isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**vision_config)
        self.text_config = text_config
        self.vision_config = vision_config
        self.include_vision_tower = include_vision_tower

        self.entity_types = list(entity_types) if entity_types is not None else list(DEFAULT_ENTITY_TYPES)
        self.type_verbalizers = (
            list(type_verbalizers) if type_verbalizers is not None else default_type_verbalizers(self.entity_types)
        )
        self.prompt_template = prompt_template
        if isinstance(type_query_counts, str):
            raise ValueError(
                f"Invalid MQSPNConfig: type_query_counts={type_query_counts!r} is a recipe value that examples/train.py "
                "resolves from the training split; MQSPNConfig needs one count per entity type."
            )
        self.type_query_counts = list(type_query_counts) if type_query_counts is not None else None
        if num_queries is None and self.type_query_counts is not None:
            num_queries = sum(self.type_query_counts)
        self.num_queries = num_queries
        self.max_regions = max_regions
        self.num_fusion_layers = num_fusion_layers
        self.fusion_num_heads = (
            fusion_num_heads if fusion_num_heads is not None else text_config.num_attention_heads
        )
        self.fusion_intermediate_size = (
            fusion_intermediate_size if fusion_intermediate_size is not None else 4 * text_config.hidden_size
        )
        self.fusion_dropout = fusion_dropout
        self.aggregator_lambda = aggregator_lambda
        self.aggregator_residual = aggregator_residual
        self.type_query_rms = type_query_rms
        self.word_pooling = word_pooling
        self.boundary_activation = boundary_activation
        self.prefix_source = prefix_source

        self.use_type_queries = use_type_queries
        self.use_entity_queries = use_entity_queries
        self.use_query_text_attention = use_query_text_attention
        self.use_prefix_integration = use_prefix_integration
        self.use_similarity_aggregator = use_similarity_aggregator
        self.use_bipartite_matching = use_bipartite_matching
        self.head_mode = head_mode if head_mode is not None else "existence"

        self.match_cost_class = match_cost_class
        self.match_cost_start = match_cost_start
        self.match_cost_end = match_cost_end
        self.match_cost_region = match_cost_region
        self.loss_weight_class = loss_weight_class
        self.loss_weight_span = loss_weight_span
        self.loss_weight_region = loss_weight_region
        self.boundary_smoothing = boundary_smoothing
        self.word_tagging_loss_weight = word_tagging_loss_weight
        self.slot_prompt_template = slot_prompt_template
        self.null_weight_normalization = null_weight_normalization
        self.uncovered_region_target = uncovered_region_target
        self.null_class_weight = null_class_weight
        self.use_auxiliary_loss = use_auxiliary_loss
        self.gold_repeat = gold_repeat
        self.existence_threshold = existence_threshold
        self.softmax_threshold = softmax_threshold
        self.max_span_words = max_span_words
        self.initializer_range = initializer_range
        self._validate_mqspn()
        super().__init__(**kwargs)

    def _validate_mqspn(self):
        """Reject inconsistent settings with a message saying which field to change."""
        problems = []
        if not self.entity_types:
            problems.append("entity_types is empty: give at least one entity type")
        if len(set(self.entity_types)) != len(self.entity_types):
            problems.append(f"entity_types has duplicates: {self.entity_types}")
        if len(self.type_verbalizers) != len(self.entity_types):
            problems.append(
                f"type_verbalizers has {len(self.type_verbalizers)} entries but entity_types has "
                f"{len(self.entity_types)}: give one verbaliser per type"
            )
        if "{mask}" not in self.prompt_template or "{}" not in self.prompt_template:
            problems.append(
                f"prompt_template {self.prompt_template!r} must contain '{{}}' (the verbaliser) and "
                "'{mask}' (the mask token)"
            )
        counts = self.type_query_counts
        if counts is not None:
            if len(counts) != len(self.entity_types) or any(int(c) != c or c < 1 for c in counts):
                problems.append(
                    f"type_query_counts={counts} must hold one integer >= 1 per entity type ({len(self.entity_types)} "
                    "types), or be None to tile num_queries over the types"
                )
            elif self.num_queries != sum(counts):
                problems.append(
                    f"num_queries={self.num_queries} differs from sum(type_query_counts)={sum(counts)}: set num_queries "
                    "to the sum (or leave it out)"
                )
        if self.num_queries is None or self.num_queries < len(self.entity_types):
            problems.append(
                f"num_queries={self.num_queries} is smaller than the number of entity types "
                f"({len(self.entity_types)}): every type needs at least one query"
            )
        if self.num_fusion_layers < 1:
            problems.append(f"num_fusion_layers={self.num_fusion_layers}: QFNet needs at least one layer")
        if self.max_regions < 0:
            problems.append(f"max_regions={self.max_regions} must be >= 0")
        if self.text_config.hidden_size % self.fusion_num_heads:
            problems.append(
                f"fusion_num_heads={self.fusion_num_heads} does not divide the text hidden size "
                f"{self.text_config.hidden_size}"
            )
        if not 0.0 <= self.aggregator_lambda <= 1.0:
            problems.append(f"aggregator_lambda={self.aggregator_lambda} must lie in [0, 1]")
        if self.boundary_activation not in BOUNDARY_ACTIVATIONS:
            problems.append(f"boundary_activation={self.boundary_activation!r}: choose one of {BOUNDARY_ACTIVATIONS}")
        if self.word_pooling not in WORD_POOLINGS:
            problems.append(f"word_pooling={self.word_pooling!r}: choose one of {WORD_POOLINGS}")
        if self.prefix_source not in PREFIX_SOURCES:
            problems.append(f"prefix_source={self.prefix_source!r}: choose one of {PREFIX_SOURCES}")
        if self.head_mode not in HEAD_MODES:
            problems.append(f"head_mode={self.head_mode!r}: choose one of {HEAD_MODES}")
        if not (self.use_type_queries or self.use_entity_queries):
            problems.append(
                "use_type_queries and use_entity_queries are both False: the model would have no queries"
            )
        if not 0.0 <= self.boundary_smoothing < 1.0:
            problems.append(f"boundary_smoothing={self.boundary_smoothing} must lie in [0, 1) (0 = one-hot boundary targets)")
        if not self.word_tagging_loss_weight >= 0:
            problems.append(f"word_tagging_loss_weight={self.word_tagging_loss_weight} must be >= 0 (0 = off)")
        if self.gold_repeat < 0:
            problems.append(f"gold_repeat={self.gold_repeat} must be 0 (off) or a positive target count")
        if self.type_query_rms is not None and not self.type_query_rms > 0:
            problems.append(f"type_query_rms={self.type_query_rms} must be positive, or None to keep the [MASK] states")
        if self.null_weight_normalization not in NULL_WEIGHT_NORMALIZATIONS:
            problems.append(
                f"null_weight_normalization={self.null_weight_normalization!r}: choose one of {NULL_WEIGHT_NORMALIZATIONS}"
            )
        if self.uncovered_region_target not in UNCOVERED_REGION_TARGETS:
            problems.append(f"uncovered_region_target={self.uncovered_region_target!r}: choose one of {UNCOVERED_REGION_TARGETS}")
        if "{mask}" not in self.slot_prompt_template or "{}" not in self.slot_prompt_template:
            problems.append(
                f"slot_prompt_template {self.slot_prompt_template!r} must contain '{{}}' (the verbaliser), '{{ordinal}}' "
                "and '{mask}'"
            )
        if self.softmax_threshold is not None and not 0.0 <= self.softmax_threshold <= 1.0:
            problems.append(f"softmax_threshold={self.softmax_threshold} must lie in [0, 1] or be None")
        if self.max_span_words < 1:
            problems.append(f"max_span_words={self.max_span_words} must be >= 1")
        if problems:
            raise ValueError("Invalid MQSPNConfig: " + "; ".join(problems) + ".")

    @property
    def num_entity_types(self):
        """p, the number of entity types."""
        return len(self.entity_types)

    @property
    def query_type_ids(self):
        """The type index of each of the u queries: i mod p, or with `type_query_counts` the types dealt
        round-robin over those with queries left (equal counts give i mod p)."""
        p = len(self.entity_types)
        if self.type_query_counts is None:
            return [i % p for i in range(self.num_queries)]
        left = [int(c) for c in self.type_query_counts]
        types = []
        while any(left):
            for t in range(p):
                if left[t]:
                    types.append(t)
                    left[t] -= 1
        return types

    @property
    def queries_per_type(self):
        """How many of the u queries each type owns, keyed by type name."""
        ids = self.query_type_ids
        return {name: ids.count(t) for t, name in enumerate(self.entity_types)}

