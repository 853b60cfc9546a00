"""Configuration: params.yaml's sections as typed dataclasses (schema.py: fields, defaults, help, validate()) and
the reading of params files (loader.py: YAML/JSON with file:line for every key, the cpu profile merged in, every
problem at once as one ConfigError); `expqa params` (show.py) prints them. Callers import from here
(`from expqa.config import TrainingConfig, load_params`): this face is the package's interface. It imports only the
standard library and PyYAML, so every other package may import it; show.py alone also uses expqa.workspace.
"""

from expqa.config.loader import (
    MAX_CONFIG_NESTING,
    ConfigError,
    Params,
    load_params,
    load_stage_params,
    params_from_dict,
    read_config_file,
)
from expqa.config.schema import (
    ALIGN_METHODS,
    CHECKPOINTING_MODES,
    EMBEDDED_MODEL,
    FP8_MODES,
    FUSED_LORA_MODES,
    GGUF_EXPORT_TYPES,
    LLAMA_PROJECTIONS,
    LM_HEAD_LOSSES,
    MAX_WEIGHT,
    MICRO_BATCH_UNITS,
    PROFILES,
    SEED_END,
    SOURCE_FORMATS,
    STAGE_SECTIONS,
    AlignConfig,
    BaseConfig,
    CollectConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    GenerationConfig,
    LoRAConfig,
    ModelConfig,
    QuantizationConfig,
    SourceConfig,
    TrainingConfig,
    is_endpoint,
    section_help,
)
