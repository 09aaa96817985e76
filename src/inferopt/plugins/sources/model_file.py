"""What the model sources that read one file (``PATH.pt2``, ``PATH.pt``) share: the path in a
spec, the error for a file that is not there, and the absolute path a saved run records."""

from __future__ import annotations

from pathlib import Path

from inferopt import ModelSource, UsageError


class ModelFileSource(ModelSource):
    """A model source whose spec is ``[SCHEME:]PATH``. Like every source it counts as running
    code (``runs_code = True``) unless the subclass declares otherwise, which a subclass may do
    only when it refuses everything in the file that would run code without
    ``ctx.trust_model``, as the ``.pt2`` loader does."""

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
