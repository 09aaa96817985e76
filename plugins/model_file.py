"""What the model sources that read one file (``PATH.pt2``, ``PATH.pt``) share: the path in a
spec, the error for a file that is not there, and the absolute path a saved run records."""

from __future__ import annotations

from pathlib import Path

from inferopt import ModelSource, UsageError


class ModelFileSource(ModelSource):
    """A model source whose spec is ``[SCHEME:]PATH``.

    Data-only (``runs_code = False``) by default: a subclass reads one file and must itself
    refuse anything in it that would run code (unpickling) unless ``ctx.trust_model``, as the
    ``.pt2`` loader does. A subclass that cannot tell (TorchScript, pickles) sets it True.
    """

    runs_code = False

    def path_of(self, spec: str) -> Path:
        prefix = f"{self.scheme}:"
        return Path(spec[len(prefix):] if spec.startswith(prefix) else spec).expanduser()

    def existing_path(self, spec: str) -> Path:
        path = self.path_of(spec)
        if not path.is_file():
            raise UsageError(f"--model {spec!r}: file {str(path)!r} does not exist")
        return path

    def portable_spec(self, spec: str) -> str:
        path = self.path_of(spec)
        return str(path.resolve()) if path.is_file() else spec
