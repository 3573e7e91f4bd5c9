"""The saved model's own config (``hf_mm_rerank_config.json``) and the files beside it: where the base model is,
which weight files belong to the save and their checksums, and reading files from a folder or a Hub repo."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import __version__

CONFIG_NAME = "hf_mm_rerank_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"


@dataclass
class ModelSpec:
    """The small config saved beside the weights; enough to rebuild the model from its base."""

    kind: str
    base_model: str
    family: str
    adapter: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    version: str = __version__
    checksums: dict[str, str] = field(default_factory=dict)  # sha256 of each weight file, checked on load
    # What sentence-transformers, reading the configuration saved beside the weights, does differently (if anything).
    sentence_transformers: list[str] = field(default_factory=list)

    def save(self, directory: str) -> None:
        self.checksums = {name: _sha256(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
                          if name in (ADAPTER_WEIGHTS, HEAD_WEIGHTS)
                          or name.startswith("model") and name.endswith(".safetensors")}  # full weights, shards
        data = {**asdict(self), "base_model": base_reference(self.base_model, directory)}
        with open(os.path.join(directory, CONFIG_NAME), "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)

    def verify(self, name_or_path: str, **hub_kwargs: Any) -> None:
        """Refuse weight files whose bytes changed since they were saved (a flipped byte loads silently)."""
        for name, expected in self.checksums.items():
            path = resolve_file(name_or_path, name, **hub_kwargs)
            if path is None:
                raise FileNotFoundError(f"{name_or_path}: {name} is missing. Fix: copy the whole folder written by "
                                        "save_pretrained(), or save it again.")
            if _sha256(path) != expected:
                raise ValueError(f"{path} is not the file that was saved (its sha256 differs from the one recorded in "
                                 f"{CONFIG_NAME}): it was damaged or modified. Fix: copy or save it again; to load "
                                 "it anyway, pass verify_checksums=False.")

    @classmethod
    def find(cls, name_or_path: str, **hub_kwargs: Any) -> ModelSpec | None:
        path = resolve_file(name_or_path, CONFIG_NAME, **hub_kwargs)
        if path is None:
            return None
        with open(path) as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); the file is damaged or was cut short. Fix: copy "
                                 "or save the model again.") from None
        if data.get("base_model", "").startswith(RELATIVE):  # a base saved inside the folder: found beside it
            data["base_model"] = os.path.normpath(os.path.join(os.path.dirname(path), data["base_model"]))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


RELATIVE = ("./", "../")


def base_reference(base: str, directory: str) -> str:
    """How a saved folder records its base model: a Hub id as it is; a local folder relative to the saved folder
    when it lives inside it (``./_base_model``: the two move together), else as an absolute path."""
    if not os.path.isdir(base):
        return base
    base_abs, directory_abs = os.path.abspath(base), os.path.abspath(directory)
    if os.path.commonpath([base_abs, directory_abs]) == directory_abs:
        return "./" + os.path.relpath(base_abs, directory_abs)
    return base_abs


def check_base(base: str, name_or_path: str) -> None:
    """A local base that is gone gets an error naming it and the argument that overrides it."""
    if os.path.isabs(base) and not os.path.isdir(base):
        inside = os.path.isdir(name_or_path) and base.startswith(os.path.abspath(name_or_path) + os.sep)
        where = (f"recorded inside the saved folder as ./{os.path.relpath(base, name_or_path)}, which was not copied "
                 "along" if inside else "moved or deleted, or the folder was copied to another machine")
        raise FileNotFoundError(
            f"{name_or_path} was trained on the local base model {base}, which is not there ({where}). Fix: pass "
            f"the base explicitly, from_pretrained({name_or_path!r}, base_model='<Hub id or local folder of that "
            "base>'), or copy the base folder back.")


def resolve_file(name_or_path: str, filename: str, **hub_kwargs: Any) -> str | None:
    """Local path of ``filename`` in a folder or Hub repo, or None when the repo does not have it."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(name_or_path, filename, **hub_kwargs)
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def set_json_field(path: str, key: str, value: Any) -> None:
    if os.path.isfile(path):
        with open(path) as handle:
            data = json.load(handle)
        data[key] = value
        with open(path, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
