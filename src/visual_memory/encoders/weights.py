"""Finding model weights on disk: a local folder, ``$VISMEM_WEIGHTS_DIR``, the hub cache.

Resolution order for a Hugging Face repository ``owner/name`` (caller first,
then the environment, then the cache, then the network):

1. ``weights=`` given by the caller: a local folder (or file, for timm), or
   another repository id;
2. ``$VISMEM_WEIGHTS_DIR/owner/name`` or ``$VISMEM_WEIGHTS_DIR/name``;
3. the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``);
4. a download into that cache, unless ``HF_HUB_OFFLINE=1`` or
   ``VISMEM_OFFLINE=1`` (tests set it, so nothing downloads silently).

When all fail, `missing_weights_error` says which model is missing and the
three ways to provide it.

Weights are identified by content (SHA-256 of the weight files), not by
where they were found, so the same checkpoint loaded from a folder or from the
hub cache gives the same `EncoderSpec` fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from ..errors import EncoderError

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
CONFIG_PATTERNS = ("config.json", "preprocessor_config.json")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def offline() -> bool:
    """True when downloads are forbidden (``HF_HUB_OFFLINE`` or ``VISMEM_OFFLINE`` set to 1/true/yes)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "VISMEM_OFFLINE"))


def hub_cache_dir() -> Path:
    """The hub cache, read from the environment at call time (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home) / "hub"


def looks_like_repo_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", text)) and not Path(text).exists()


def weights_dir_candidates(repo: str) -> list[Path]:
    root = os.environ.get("VISMEM_WEIGHTS_DIR")
    if not root:
        return []
    return [Path(root) / repo, Path(root) / repo.split("/")[-1]]


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file()


def cached_snapshot(repo: str) -> Optional[Path]:
    """The hub-cache snapshot folder of ``repo`` holding config + weights, or None. Never downloads."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, "config.json", cache_dir=str(hub_cache_dir()))
    except Exception:  # malformed repo id or unreadable cache: a miss
        return None
    if not isinstance(hit, str):
        return None
    folder = Path(hit).parent
    return folder if has_weights(folder) else None


def local_hf_folder(repo: str) -> Optional[Path]:
    """Where ``repo``'s weights already are on this machine (env folder or hub cache), or None."""
    for cand in weights_dir_candidates(repo):
        if (cand / "config.json").is_file() and has_weights(cand):
            return cand
    return cached_snapshot(repo)


def missing_weights_error(name: str, repo: str, reason: str, *, flag: str = "weights") -> EncoderError:
    env_dir = os.environ.get("VISMEM_WEIGHTS_DIR") or "<dir>"
    return EncoderError(
        f"encoder {name!r} needs the weights of the Hugging Face model {repo!r}, which are not on this machine "
        f"({reason}). Provide them in one of these ways: "
        f"(1) pass a local folder holding config.json and model.safetensors: "
        f"create_encoder({name!r}, {flag}='/path/to/{repo.split('/')[-1]}') or `--{flag} PATH` on the command line; "
        f"(2) put that folder at $VISMEM_WEIGHTS_DIR/{repo} (now {env_dir}/{repo}); "
        f"(3) on a connected machine run `hf download {repo} --include 'config.json' "
        f"'preprocessor_config.json' '*.safetensors' --local-dir {repo.split('/')[-1]}` "
        f"(or `huggingface-cli download ...` with older huggingface_hub) and copy the folder here, "
        f"or copy that machine's hub cache to {hub_cache_dir()}."
    )


def resolve_hf_folder(name: str, repo: str, weights: Optional[str | os.PathLike] = None) -> Path:
    """A local folder holding ``config.json`` and the weights for ``repo`` (see the module docstring).

    Raises
    ------
    EncoderError
        If ``weights`` names a folder that does not exist or lacks weights, or
        the repository is nowhere local and cannot be downloaded.
    """
    if weights is not None:
        text = os.fspath(weights)
        path = Path(text).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise EncoderError(f"{path}: not a Hugging Face model folder (no config.json) for encoder {name!r}")
            if not has_weights(path):
                raise EncoderError(f"{path}: no weights (*.safetensors or pytorch_model.bin) for encoder {name!r}")
            return path
        if not looks_like_repo_id(text):
            raise EncoderError(f"weights for encoder {name!r}: {text} is neither a folder nor a repository id (owner/name)")
        repo = text
    local = local_hf_folder(repo)
    if local is not None:
        return local
    if offline():
        raise missing_weights_error(name, repo, "downloads are off: HF_HUB_OFFLINE/VISMEM_OFFLINE is set")
    return download_hf(name, repo)


def download_hf(name: str, repo: str) -> Path:
    """Download config and safetensors weights of ``repo`` into the hub cache."""
    from huggingface_hub import snapshot_download

    log.warning("downloading %s for encoder %s into %s", repo, name, hub_cache_dir())
    try:
        folder = Path(snapshot_download(repo, cache_dir=str(hub_cache_dir()), allow_patterns=list(CONFIG_PATTERNS + WEIGHT_PATTERNS)))
        if not has_weights(folder):  # an old repository with only a PyTorch pickle
            folder = Path(snapshot_download(repo, cache_dir=str(hub_cache_dir()), allow_patterns=list(CONFIG_PATTERNS) + ["pytorch_model.bin"]))
    except Exception as exc:
        raise missing_weights_error(name, repo, f"download failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not has_weights(folder):
        raise missing_weights_error(name, repo, "the repository has no safetensors or pytorch_model.bin weights")
    return folder


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file; free for hub-cache files (their blob is named by it), memoised otherwise."""
    real = Path(os.path.realpath(path))
    if _SHA256.match(real.name):  # hub cache: blobs/<sha256> for LFS files
        return real.name
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def weights_identity(files: Sequence[Path]) -> str:
    """``sha256:<16 hex>`` over the weight files (sorted by name), the `EncoderSpec.weights` value."""
    files = sorted(files, key=lambda p: Path(p).name)
    if len(files) == 1:
        return "sha256:" + file_sha256(files[0])[:16]
    h = hashlib.sha256("".join(file_sha256(f) for f in files).encode())
    return "sha256:" + h.hexdigest()[:16]


def hf_weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    return files or [folder / "pytorch_model.bin"]
