"""Typed config sections (``fields``: the machinery; ``sections``: the fields of GRPO / OPEFO).

Pure Python plus the math's registries: importing this loads no Ray.
"""

from opefo_rllib.config.fields import (
    SECTIONS,
    ConfigError,
    FieldSpec,
    Section,
    all_fields,
    check_value,
    coerce_value,
    markdown_table,
    register_section,
    setting,
    validate_sections,
)
from opefo_rllib.config import sections as _sections  # noqa: F401  (registers the built-in sections)
from opefo_rllib.config.sections import RLLIB_SECTION, RUN_SECTION, rllib_fields, run_fields

__all__ = ["SECTIONS", "ConfigError", "FieldSpec", "Section", "all_fields", "check_value", "coerce_value", "markdown_table",
           "register_section", "setting", "validate_sections", "RLLIB_SECTION", "RUN_SECTION", "rllib_fields",
           "run_fields"]
