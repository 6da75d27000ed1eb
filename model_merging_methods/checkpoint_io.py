"""Checkpoint I/O in one import: reading (:mod:`model_merging_methods.reader`), writing
(:mod:`model_merging_methods.writer`) and publishing (:mod:`model_merging_methods.publish`). Kept so that code written
against the earlier single module keeps working; new code imports from the three modules directly."""

from __future__ import annotations

from model_merging_methods.publish import atomic_output_dir, check_output_path
from model_merging_methods.reader import (
    BIN_INDEX,
    DTYPES_BY_NAME,
    MAX_HEADER_BYTES,
    MAX_JSON_BYTES,
    SAFETENSORS_INDEX,
    CheckpointReader,
    NameResolver,
    TensorInfo,
    find_local_model,
    hub_cache_repo,
    open_regular_file,
    read_json_object,
    read_safetensors_header,
    resolve_model_path,
    torch_dtype_name,
)
from model_merging_methods.writer import (
    MAX_SIZE,
    MODEL_SIDE_FILES,
    TOKENIZER_FILES,
    ShardedSafetensorsWriter,
    parse_size,
    write_side_files,
)

__all__ = [
    "BIN_INDEX",
    "DTYPES_BY_NAME",
    "MAX_HEADER_BYTES",
    "MAX_JSON_BYTES",
    "MAX_SIZE",
    "MODEL_SIDE_FILES",
    "SAFETENSORS_INDEX",
    "TOKENIZER_FILES",
    "CheckpointReader",
    "NameResolver",
    "ShardedSafetensorsWriter",
    "TensorInfo",
    "atomic_output_dir",
    "check_output_path",
    "find_local_model",
    "hub_cache_repo",
    "open_regular_file",
    "parse_size",
    "read_json_object",
    "read_safetensors_header",
    "resolve_model_path",
    "torch_dtype_name",
    "write_side_files",
]
