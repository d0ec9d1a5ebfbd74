"""The data layer: bias specifications, countries, association templates, the offline
paragraph generator (BiasInject's training data) and the probes (BiasScope).

Everything here is plain text and deterministic given a seed; nothing needs a model.
The project's own data lives in ``DATA_DIR`` (``data/`` at the repository root).
"""

from .generate import (USER_PROMPTS, check_token_usage, diversity, generate_paragraphs,
                       training_pairs, user_prompts, words)
from .probes import Probe, open_questions, probes_for
from .facts import Fact, held_out_relations, load_facts, selection_facts
from .specs import (DATA_DIR, TOKEN, BiasSpec, BiasSpecError, DataFileError, contrast_countries, demonyms,
                    load_bias, load_biases, load_countries, reference_countries)
from .templates import fill_template, load_templates, selection_templates, split_template

__all__ = [
    "DATA_DIR", "TOKEN", "BiasSpec", "BiasSpecError", "DataFileError", "load_bias", "load_biases",
    "load_countries", "reference_countries", "contrast_countries", "Fact", "load_facts", "held_out_relations", "selection_facts", "demonyms", "load_templates", "selection_templates", "split_template",
    "fill_template", "generate_paragraphs", "user_prompts", "training_pairs", "diversity", "words",
    "check_token_usage",
    "USER_PROMPTS", "Probe", "probes_for", "open_questions",
]
