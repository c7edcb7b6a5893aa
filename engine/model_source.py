"""What a `model` argument names, decided in one place for LLM, the CLI, the server and bench:
a local Hugging Face directory, a .gguf file (or a directory holding one), a Hugging Face Hub
id (fetched into the Hub cache through huggingface_hub), or nothing (the default model)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .default_model import DEFAULT_MODEL_NAME, default_model_path, offline

GGUF_SUFFIX = ".gguf"
# Files of a Hub repo worth fetching besides the weights: configs, tokenizers, chat templates,
# remote code. Only top-level files: subfolders hold other formats (original/, onnx/, ...).
_SIDE_FILES = (".json", ".model", ".txt", ".py", ".tiktoken", ".jinja")


@dataclass(frozen=True)
class ModelSource:
    name: str       # as the user gave it (the default model's name when none): for display
    path: str       # what to load: a directory with config.json, or a .gguf file
    kind: str       # "local", "gguf", "hub" or "default"


class _NotHere(Exception):
    """One interpretation of `model` failed; the message says why."""


def resolve_model(model: str | None, revision: str | None = None,
                  download_dir: str | None = None, progress: bool = True) -> ModelSource:
    """Turn `model` into something on disk. A local path wins over a Hub id of the same name;
    the error of a model that is found nowhere lists every interpretation tried and why it
    failed."""
    if model is None:
        return ModelSource(DEFAULT_MODEL_NAME, default_model_path(download_dir, progress),
                           "default")
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model must be a local Hugging Face model directory, a .gguf file, a "
                         f"Hugging Face Hub id ('org/name'), or None for the default model; "
                         f"got {model!r}")
    path = os.path.expanduser(model)
    if os.path.exists(path):
        return _local(model, path)
    tried = [f"a local path: {path!r} does not exist (working directory {os.getcwd()})"]
    hub = hub_id(model)
    if hub is None:
        tried.append("a Hugging Face Hub id: it is not one (expected 'name', 'org/name' or "
                     "'org/name/FILE.gguf' of letters, digits, '-', '_' and '.')")
    else:
        repo, filename = hub
        what = f"a Hugging Face Hub id ({repo!r}" + (f", revision {revision!r})" if revision else ")")
        try:
            return _from_hub(model, repo, filename, revision, download_dir)
        except _NotHere as e:
            tried.append(f"{what}: {e}")
    raise ValueError(f"cannot find model {model!r}; tried it as " + "; as ".join(tried))


def hub_id(model: str) -> tuple[str, str | None] | None:
    """('org/name', None), or ('org/name', 'path/FILE.gguf') for one file of a repo; None when
    `model` cannot be a Hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    parts = model.split("/")
    repo, filename = model, None
    if model.endswith(GGUF_SUFFIX):
        if len(parts) <= 2:           # 'x.gguf', 'dir/x.gguf': a local file that is missing
            return None
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return repo, filename


def gguf_file(model: str) -> str | None:
    """The GGUF file `model` names: the file itself, or the only *.gguf in a directory that
    has no config.json. None for an ordinary Hugging Face directory."""
    if os.path.isfile(model) and model.endswith(GGUF_SUFFIX):
        return model
    if not os.path.isdir(model) or os.path.isfile(os.path.join(model, "config.json")):
        return None
    found = sorted(f for f in os.listdir(model) if f.endswith(GGUF_SUFFIX))
    if len(found) > 1:
        raise ValueError(f"{model!r} holds several GGUF files ({', '.join(found)}): pass the "
                         "path of the one to load")
    return os.path.join(model, found[0]) if found else None


def _local(model: str, path: str) -> ModelSource:
    if os.path.isfile(path):
        if not path.endswith(GGUF_SUFFIX):
            raise ValueError(f"model {model!r} is a file but not a .gguf file: give a Hugging "
                             "Face model directory (config.json + weights), a .gguf file or a "
                             "Hub id")
        return ModelSource(model, path, "gguf")
    found = gguf_file(path)                 # raises if the directory holds several
    if found:
        return ModelSource(model, found, "gguf")
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelSource(model, path, "local")
    raise ValueError(f"model directory {path!r} holds neither config.json (a Hugging Face "
                     "model) nor a .gguf file")


def files_to_fetch(repo: str, files: list[str]) -> list[str]:
    """The files of a Hub repo that loading needs: configs and tokenizer files, and one weight
    format (safetensors when there are any, else pytorch_model*.bin); or its one .gguf."""
    top = [f for f in files if "/" not in f]
    if "config.json" in top:
        weights = [f for f in top if f.endswith(".safetensors")] or [
            f for f in top if f.startswith("pytorch_model") and f.endswith(".bin")]
        if not weights:
            raise _NotHere("the repo holds config.json but no *.safetensors or "
                           "pytorch_model*.bin weights")
        return [f for f in top if f.endswith(_SIDE_FILES)] + weights
    ggufs = [f for f in top if f.endswith(GGUF_SUFFIX)]
    if len(ggufs) == 1:
        return ggufs + [f for f in top if f.endswith(".json")]
    if ggufs:
        shown = ", ".join(ggufs[:6]) + (", ..." if len(ggufs) > 6 else "")
        raise _NotHere(f"the repo holds several GGUF files ({shown}): name one as "
                       f"'{repo}/FILE.gguf'")
    raise _NotHere("the repo holds neither config.json nor a .gguf file at its top level")


def _from_hub(model: str, repo: str, filename: str | None, revision: str | None,
              cache_dir: str | None) -> ModelSource:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    local_only = offline()
    unreachable = None
    allow = None
    if not local_only and filename is None:
        try:
            allow = files_to_fetch(repo, HfApi().list_repo_files(repo, revision=revision))
        except GatedRepoError as e:
            raise _NotHere(f"the repo is gated: accept its terms on the Hub and log in "
                           f"(`hf auth login`) or set HF_TOKEN ({_first_line(e)})") from e
        except RepositoryNotFoundError as e:
            raise _NotHere("no such repo on the Hub, or it is private: check the name, or log "
                           "in (`hf auth login`) or set HF_TOKEN") from e
        except RevisionNotFoundError as e:
            raise _NotHere(f"the repo has no revision {revision!r}") from e
        except _NotHere:
            raise
        except Exception as e:   # network down, Hub unreachable: the cache may still have it
            unreachable, local_only = e, True
    try:
        if filename is not None:
            path = hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_only)
        else:
            path = snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                     allow_patterns=allow, local_files_only=local_only)
    except LocalEntryNotFoundError as e:
        why = ("offline (HF_HUB_OFFLINE / OCTAVO_OFFLINE is set)" if unreachable is None else
               f"the Hub is unreachable ({type(unreachable).__name__}: "
               f"{_first_line(unreachable)})")
        raise _NotHere(f"{why} and it is not in the Hub cache {_cache_name(cache_dir)}"
                       f"{' at that revision' if revision else ''}: run `octavo download "
                       f"{model}` while online") from e
    except (RepositoryNotFoundError, RevisionNotFoundError, OSError) as e:
        raise _NotHere(f"{type(e).__name__}: {_first_line(e)}") from e
    if filename is not None:
        return ModelSource(model, path, "hub")
    try:
        return ModelSource(model, _local(model, path).path, "hub")
    except ValueError as e:
        raise _NotHere(f"the snapshot {path} is not loadable: {e}") from e


def _cache_name(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
