"""Safe, atomic file I/O: nothing half-written, nothing unpickled.

Every output the project writes goes through ``atomic_write_*`` (temp file in the same folder, fsync,
rename), so a run killed at any moment leaves either the old complete file or the new one.
Every tensor file it reads goes through ``load_tensors`` (safetensors, or ``torch.load`` with
``weights_only=True``), so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from potion.core.errors import CheckpointError, PotionError

if TYPE_CHECKING:  # torch is imported where tensors are read or written, so JSON and hashing stay light
    import torch


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class StorageError(PotionError, OSError):
    """An output could not be written (full disk, no permission, not a folder): one line, never a traceback.

    Also an OSError, so callers that treat a failed cache write as a cache miss keep doing so.
    """

    def __str__(self) -> str:
        return str(self.strerror)


# Free space below this after a failed write means the disk filled up (writers such as torch.save report
# a full disk only as "unexpected pos ...").
NEARLY_FULL_BYTES = 1 << 20


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp (and some writers) make 0600; outputs get the usual mode
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        full = isinstance(exc, Exception) and _nearly_full(path.parent)  # any writer's way of saying "disk full"
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) or full:
            raise storage_error(path, exc, full) from exc
        raise
    return path


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def storage_error(path: Path, exc: BaseException, full: bool = False) -> StorageError:
    """The one-line error for a failed write of ``path``: names the file, the reason and the fix."""
    code = getattr(exc, "errno", None)
    if full or code in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(errno.ENOSPC, f"cannot write {path}: no space left on the device; free some space, or "
                                          "write elsewhere (out_dir=..., POTION_CACHE_DIR=...)")
    reason = getattr(exc, "strerror", None) or one_line(exc)
    return StorageError(code or errno.EIO, f"cannot write {path}: {reason or type(exc).__name__}; choose a "
                                           "writable folder (out_dir=..., POTION_CACHE_DIR=...)")


def one_line(exc: object, limit: int = 300) -> str:
    """An exception as one short line for an ``error:`` message: its first line, else its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def plain(value: Any) -> Any:
    """Nested mappings and sequences (OmegaConf containers included) as dicts and lists, for JSON and YAML.

    An OmegaConf container is resolved as a whole, so a mandatory value left unset stays ``"???"``.
    """
    from omegaconf import Container, OmegaConf

    if isinstance(value, Container):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray):
        return [plain(v) for v in value]
    return value


def write_torch(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so a full disk surfaces as OSError(ENOSPC) rather than a RuntimeError."""
    import torch

    with open(path, "wb") as fh:
        torch.save(obj, fh)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes so that ``path`` is either absent/old or complete."""
    return _atomic(Path(path), lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically, pretty-printed and key-sorted for stable diffs."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    torch = sys.modules.get("torch")  # no tensor can exist before torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Mapping):  # a DictConfig, or another mapping type
        return dict(obj)
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):  # a ListConfig, a tuple subclass
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning a truncated or corrupt file into a CheckpointError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"missing file {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt JSON file {path} ({exc.__class__.__name__}); delete it or rerun") from exc


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Save a flat name->tensor mapping atomically, as safetensors (.safetensors) or a weights-only .pt.

    ``metadata`` (text, safetensors only) is stored in the file's header, e.g. a content digest.
    """
    path = Path(path)
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = dict(metadata) if metadata else None
        # safetensors refuses tensors that share memory: each is saved from a clone of its own
        return _atomic(path, lambda p: save_file({k: v.clone() for k, v in flat.items()}, str(p), metadata=meta))
    if metadata:
        raise ValueError("metadata needs a .safetensors file")
    return _atomic(path, lambda p: write_torch(flat, p))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a name->tensor mapping without unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``,
    which refuses pickled code. Every failure becomes one CheckpointError line.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every loader failure means the same thing to the user
        msg = one_line(exc, limit=1000)
        if _raw_pickle(path):
            raise CheckpointError(
                f"refused to load {path}: it is a plain Python pickle (pickle.dump), not a torch.save or safetensors "
                "file, and unpickling it could run code; re-save the weights with torch.save(model.state_dict(), "
                "path) or as .safetensors"
            ) from None
        if refused_pickle(exc):
            raise CheckpointError(
                f"refused to load {path}: it contains pickled objects, not plain tensors "
                "(only state dicts of tensors are accepted; re-save with torch.save(model.state_dict()) "
                "or as .safetensors)"
            ) from exc
        if "Weights only load failed" in msg:  # torch's text advises weights_only=False: never repeat that
            msg = msg.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
            msg = msg if len(msg) < 100 else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt or truncated ({msg[:160]})") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return dict(obj)


def read_tensor_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text metadata in a safetensors file's header ({} when none); a CheckpointError if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - any reader failure means a damaged file
        raise CheckpointError(f"cannot read {path}: corrupt or truncated ({type(exc).__name__})") from exc


def _raw_pickle(path: Path) -> bool:
    """Whether a file torch.load refused is a pickle stream of its own (``pickle.dump``): not torch.save's zip
    archive nor its legacy format (a pickled magic number first), and opening with a pickle protocol 2+ header
    (PROTO opcode 0x80, then the protocol number)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_LEGACY_TORCH_HEAD))
    except OSError:
        return False
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and head != _LEGACY_TORCH_HEAD


# torch.save(..., _use_new_zipfile_serialization=False) starts with pickle.dump(0x1950a86a20f9469cfc6c, protocol 2)
_LEGACY_TORCH_HEAD = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def refused_pickle(exc: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` failed because the file names a code object (not because it is
    damaged: garbage bytes also raise its "Weights only load failed" error, with "Unsupported operand")."""
    return "GLOBAL" in str(exc) or "Unsupported global" in str(exc)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict's names, dtypes, shapes and bytes: a content key for caches."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of a JSON-serialisable object (key-sorted): a content key for settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def cache_dir() -> Path:
    """The content-addressed cache root: $POTION_CACHE_DIR, else ~/.cache/potion."""
    root = os.environ.get("POTION_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "potion")
    return Path(root)
