"""Files as structprune reads and writes them: written whole or not at all, read without running code.

* :func:`write_atomic` writes to a temporary file beside the target and renames it into place, so an
  interrupted write never leaves a half-written output; :func:`check_output` refuses an output path before any
  work is done (it exists, it is a directory, its directory cannot be written);
* :func:`load_tensors` reads a torch file of tensors and plain data only (``weights_only=True``): a file that
  names Python objects is refused unless the caller trusts it;
* :func:`resolve_constructor` turns ``"package.module:Name"`` into the class (or, trusted, the callable) it
  names, refusing what a file should not make us call.
"""

from __future__ import annotations

import importlib
import inspect
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import StructPruneError, first_line


def write_atomic(path: str | os.PathLike, write, force: bool = False) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; never leaves a half-written ``path``. The file gets the
    permissions any new file gets here (the umask's), not the temporary file's private 0600.

    An existing ``path`` is an error unless ``force``.
    """
    path = Path(path)
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        as_umask_allows(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def as_umask_allows(path: str | os.PathLike) -> None:
    """Give ``path`` (made private by ``tempfile``) the mode a file or directory created here normally gets:
    0666 (0777 for a directory) less the process's umask, so that a model saved for a team or a serving process is
    readable by them where the umask says so."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def check_output(path: str | os.PathLike, force: bool = False, what: str = "output", directory: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written or that exists (unless ``force``).
    ``directory``: the output is a model directory; ``force`` replaces only an earlier one (with a config.json) or
    an empty directory, never any other directory."""
    path = Path(path)
    if path.is_dir() and not directory:
        raise StructPruneError(f"{what} {path} is a directory, expected a file path")
    if path.is_dir() and force:
        refuse_non_model_directory(path, what)
    if path.exists() and not force:
        raise StructPruneError(f"{what} {path} already exists; pass --force (force=True) to overwrite it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise StructPruneError(f"{what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise StructPruneError(f"{what} {path}: the directory {parent} is not writable")
    return path


def refuse_non_model_directory(path: Path, what: str = "output") -> None:
    """A directory that is about to be replaced must hold a model (a config.json) or nothing: any other is refused,
    whatever ``force`` says."""
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise StructPruneError(f"{what} {path} is a directory that holds no model (no config.json): it is not "
                               f"replaced, even with --force; choose another path")


def load_tensors(path: str | os.PathLike, trust_checkpoint: bool = False, what: str = "checkpoint",
                 advice: str | None = None):
    """``torch.load`` of tensors and plain data only; a file that names Python objects is refused (with
    ``advice`` on what to do) unless ``trust_checkpoint``, and any other failure is one clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        safe_error = exc
    if is_pickled_code(safe_error):
        if not trust_checkpoint:
            raise StructPruneError(f"{what} {path} holds pickled Python objects; loading it would run any code the "
                                   f"file contains. {advice or _convert_advice(path)}")
        warnings.warn(f"structprune: unpickling {path} because trust_checkpoint was given; this runs any code "
                      f"the file holds", stacklevel=3)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise StructPruneError(f"{what} {path} is not readable: {first_line(exc)}") from None
    raise StructPruneError(f"{what} {path} is not readable (truncated or corrupted?): "
                           f"{first_line(safe_error)}") from None


def is_pickled_code(error: Exception) -> bool:
    """Whether torch's weights-only reader refused a file for naming Python objects (code), not for damage."""
    return "Unsupported global" in str(error)


def _convert_advice(path) -> str:
    return (f"structprune 0.1 saved models from outside the zoo this way. If you trust where it came from, convert "
            f"it once: structprune convert --trust-checkpoint {path} NEW.pt (Python: structprune.load(path, "
            f"trust_checkpoint=True))")


def import_module(module_name: str, spec: str):
    """The module a ``module:name`` spec names; a module that is not found is an error that says where Python looks
    (PYTHONPATH, the current folder), and one that fails to import is its own error, named."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing is not None and (module_name == missing or module_name.startswith(missing + ".")):
            file = missing.replace(".", "/") + ".py"
            raise StructPruneError(
                f"{spec}: cannot import it: no module {missing!r} here: put the folder that holds {file} on "
                f"PYTHONPATH (PYTHONPATH=/path/to/that/folder structprune ...) or run from that folder (the "
                f"current one is {Path.cwd()}), or install the package that defines it") from None
        raise StructPruneError(f"{spec}: cannot import it: importing {module_name} failed "
                               f"({first_line(exc)})") from None
    except Exception as exc:  # the module's own code failed while it was imported
        raise StructPruneError(f"{spec}: cannot import it: importing {module_name} failed ({type(exc).__name__}: "
                               f"{first_line(exc)})") from None


def resolve_constructor(spec: str, trusted: bool = False):
    """The callable named by ``"package.module:qualname"``; refuses callables a file should not make us call."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise StructPruneError(f"a constructor must be written 'package.module:name', got {spec!r}")
    module_name, qualname = spec.split(":")
    obj = import_module(module_name, spec)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise StructPruneError(f"{module_name} has no {qualname} (from {spec})")
    is_module_class = inspect.isclass(obj) and issubclass(obj, nn.Module)
    if not is_module_class and not trusted:
        raise StructPruneError(f"{spec} is not an nn.Module class; calling a function that a file names can run any "
                               f"code, so it needs trust_checkpoint=True (--trust-checkpoint) for files you trust")
    if not callable(obj):
        raise StructPruneError(f"{spec} is not callable")
    return obj
