"""``results.json``: a JSON list of records that is valid JSON after every write."""
import json
import math
from pathlib import Path

from utils.checkpoint import atomic_write
from utils.errors import UserError


def to_json_safe(obj):
    """Plain-JSON copy of ``obj``: numpy/torch values become Python ones, NaN/inf become null.

    Strict JSON has no NaN; ``null`` keeps the file readable by every JSON parser.
    """
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return to_json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class ResultsFile:
    """Append records to a JSON list file, rewriting it atomically each time.

    The reference code appended objects after the closing bracket, which left an invalid
    file; here every write produces a complete list, so the file can be read at any moment.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.records = []
        if self.path.exists():
            try:
                self.records = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise UserError(f"{self.path} is not valid JSON ({exc}); move it away to start a new list") from None
            if not isinstance(self.records, list):
                raise UserError(f"{self.path} holds a JSON {type(self.records).__name__}, expected a list")

    def append(self, record):
        self.records.append(record)
        self._write()

    def truncate_after(self, epoch):
        """Drop records of epochs after ``epoch``: a resumed run redoes those epochs."""
        kept = [r for r in self.records if r.get("epoch", -1) <= epoch]
        if len(kept) != len(self.records):
            self.records = kept
            self._write()

    def _write(self):
        write_json(self.path, self.records)


def write_json(path, obj):
    """Write ``obj`` as strict JSON (NaN -> null, see :func:`to_json_safe`), atomically."""
    text = json.dumps(to_json_safe(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text), mode="w")
