"""Reading raw text: JSONL records with checked fields, plain-text notes, and globs of either.

Every problem a user can fix is a ``UserError`` naming the file and the 1-based line. Nothing is dropped silently:
with ``skip_bad_lines=True`` bad lines are counted and the count is returned beside the records.
"""
from __future__ import annotations

import difflib
import glob
import hashlib
import json
import logging
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from cancerllm_jax.errors import UserError, suggest

log = logging.getLogger(__name__)

TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
SUPPORTED_EXTENSIONS = (".jsonl", ".txt")


class DuplicateKey(ValueError):
    """A JSON object that names one key twice (``json.loads`` would keep the last value silently)."""

    def __init__(self, key: str):
        super().__init__(f"key {key!r} given twice in one object (only one value can be read)")


def _unique_keys(pairs: list) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
        obj[key] = value
    return obj


def loads_json_line(text: str):
    """``json.loads`` that refuses a key given twice in one object (``DuplicateKey``)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def json_problem(e: ValueError | RecursionError, what: str = "invalid JSON") -> str:
    """What ``loads_json_line`` refused, in one phrase: ``what`` and the parser's message (its column), a key given
    twice, nesting too deep (``RecursionError``) or an integer of more than 4300 digits (``ValueError``)."""
    if isinstance(e, json.JSONDecodeError):
        return f"{what} ({e.msg.removesuffix(' at')} at column {e.colno})"  # no "at at"
    if isinstance(e, DuplicateKey):
        return str(e)
    if isinstance(e, RecursionError):
        return f"{what} (nested too deeply)"
    return f"{what} ({str(e).split(';')[0]})"  # an integer of more than 4300 digits


def load_json_file(path: str, what: str = "invalid JSON", unique_keys: bool = True):
    """A whole JSON file's value (a leading BOM dropped). Bytes that are not UTF-8 or a value ``loads_json_line``
    refuses is one ``UserError`` naming ``path:line`` (the line where known); a file that cannot be read is one
    naming ``path``. ``unique_keys=False`` reads a key given twice as ``json.load`` does (the last one), for the
    Hugging Face files transformers and peft read so."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    text = decode_utf8(path, data)
    try:
        return loads_json_line(text) if unique_keys else json.loads(text)
    except (ValueError, RecursionError) as e:
        line = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise UserError(f"{path}{line}: {json_problem(e, what)}") from None


def require_file(path: str) -> None:
    """A missing path, or a folder where a file is wanted, is one error saying which."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder; give a file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return TYPE_NAMES.get(t, t.__name__)


def json_type_name(value: Any) -> str:
    return "null" if value is None else _type_name(type(value))


def _type_ok(value: Any, expected: type | tuple[type, ...]) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in types:  # JSON true/false is not a number here
        return False
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def content_digest(arrays) -> str:
    """A short sha256 of int arrays in order (each with its length): ``data_counts``' check that a resumed run reads
    the very data it started on, not only data of the same size."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.asarray(a).reshape(-1)
        h.update(np.int64(a.size).tobytes())
        for i in range(0, a.size, 1 << 22):  # as int64 in 4M-value slices, not a whole int64 copy of the corpus
            h.update(np.ascontiguousarray(a[i:i + (1 << 22)], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


ALPACA_FIELDS = {"response": "output"}  # our field -> the Alpaca name a user's file may hold it under


CHAT_FIELDS = ("messages", "conversations", "conversation")  # chat-format records (OpenAI / ShareGPT style)


def renamed_field_hint(name: str, record: dict) -> str:
    """For a missing field: " (rename 'output' to 'response')" when the record holds its Alpaca name, else the
    nearest key (" (did you mean X?)") or ''."""
    alpaca = ALPACA_FIELDS.get(name)
    if alpaca is not None and alpaca in record:
        return f" (rename '{alpaca}' to '{name}': Alpaca's '{alpaca}' is our '{name}')"
    chat = next((k for k in CHAT_FIELDS if isinstance(record.get(k), list)), None)
    if chat is not None and name in ("instruction", "response"):
        return (f" (this is a chat record, '{chat}': a list of turns; write each example as 'instruction', "
                "optional 'context' and 'response' text fields, e.g. the user turn as the instruction and the "
                "assistant turn as the response)")
    return suggest(name, record.keys())


def _check_record(obj: Any, required: dict[str, Any], optional: dict[str, Any], nonempty: tuple[str, ...] = ()
                  ) -> str | None:
    """The problem with one parsed line, or None; ``nonempty`` string fields must hold more than whitespace."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {json_type_name(obj)}"
    for name, expected in required.items():
        if name not in obj:
            return f"missing field '{name}'{renamed_field_hint(name, obj)}"
        if not _type_ok(obj[name], expected):
            return f"field '{name}' should be a {_type_name(expected)}, got {json_type_name(obj[name])}"
        if name in nonempty and not obj[name].strip():
            return f"field '{name}' is empty"
    for name, expected in optional.items():
        if obj.get(name) is not None and not _type_ok(obj[name], expected):
            return f"field '{name}' should be a {_type_name(expected)} (or absent), got {json_type_name(obj[name])}"
    return None


def other_spellings(obj: dict, required: dict[str, Any], optional: dict[str, Any]) -> list[tuple[str, str]]:
    """``(key, field)`` for each optional ``field`` missing from ``obj`` whose value may sit under another spelling:
    a key of the field's type that is another case of its name, a typo of a name of 4+ letters (not a name plus a
    suffix, such as ``context_id``), or its Alpaca name. Such text would not be read: a caller warns."""
    known, found = {*required, *optional}, []
    for name, expected in optional.items():
        if name in obj:
            continue
        for key, value in obj.items():
            if key in known or value is None or not _type_ok(value, expected):
                continue
            low = key.lower()
            if low == name or key == ALPACA_FIELDS.get(name) or (
                    len(name) >= 4 and not low.startswith((name + "_", name + "-"))
                    and difflib.SequenceMatcher(None, low, name).ratio() >= 0.8):
                found.append((key, name))
                break
    return found


def _encodable(obj: Any) -> bool:
    """False when a string in ``obj`` holds a lone surrogate (JSON allows ``"\\ud800"``; UTF-8 does not)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_jsonl(path: str, required: dict[str, Any], skip_bad_lines: bool = False, *,
               optional: dict[str, Any] | None = None, line_key: str | None = None,
               skip_flag: str | None = "--skip-bad-lines", nonempty: tuple[str, ...] = (),
               check: Callable[[dict], str | None] | None = None, allow_empty: bool = False
               ) -> tuple[list[dict], int]:
    """Records of a JSONL file and the number of bad lines skipped.

    ``required`` maps field → type (or tuple of types); ``optional`` fields are type-checked when present and not
    null (a null one is dropped: absent). Blank lines are ignored. A bad line (not UTF-8, invalid JSON, a lone
    surrogate escape, not an object, missing field, wrong type, a ``nonempty`` field of only whitespace) raises
    ``UserError`` naming ``path:line`` unless ``skip_bad_lines``, in which case it is counted (and the first few
    are logged). A file with no valid record
    always raises. ``line_key`` stores each record's line number there. ``skip_flag``: the option an error
    suggests for skipping bad lines (None where the command has none). ``check``: the caller's own rule, a
    JSON object's problem or None, applied before the field checks; a line it finds bad is a bad line like the
    others. ``allow_empty`` (one file of
    several, skipping bad lines): a file with no valid record is a warning, not an error.
    """
    optional = optional or {}
    require_file(path)
    records: list[dict] = []
    skipped = 0
    first_problem = ""
    strays: dict[tuple[str, str], list[int]] = {}  # (key, the field it may mean) -> [first line, lines]
    shadowed: dict[tuple[str, str], list[int]] = {}  # (Alpaca name, our field, both given) -> [first line, lines]
    alpaca_read = {name: alpaca for name, alpaca in ALPACA_FIELDS.items() if name in {*required, *optional}}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            problem = None
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[:e.start].decode("utf-8", "replace")) + 1  # characters, as an editor counts
                problem = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column})"
                if lineno == 1 and raw.startswith(b"\x1f\x8b"):
                    problem += "; the file is gzip-compressed: decompress it first"
            else:
                if not line.strip():
                    continue
                try:
                    obj = loads_json_line(line.rstrip("\r\n"))
                except (ValueError, RecursionError) as e:  # also a key given twice, an integer of 4300+ digits
                    problem = json_problem(e)
                    if (isinstance(e, json.JSONDecodeError) and e.msg == "Extra data"
                            and line[:e.pos].rstrip(" \t").endswith("\r")):  # old Mac line ends:
                        # the whole file reads as one line, its records run together after a CR
                        problem += "; its lines end in a lone CR: convert the file to LF (or CRLF) line ends"
                    elif lineno == 1 and line.strip() in ("[", "{"):  # a pretty-printed JSON document
                        problem += "; this reads as one JSON document over many lines: write one object per line"
                else:
                    # the caller's rule first: a record in another format (generate.py's `prompt`) is named as
                    # such, not as one missing a field
                    problem = check(obj) if check is not None and isinstance(obj, dict) else None
                    problem = problem or _check_record(obj, required, optional, nonempty)
                    if problem is None and "\\u" in line and not _encodable(obj):
                        problem = "a \\u escape that is no character (a lone UTF-16 surrogate)"
            if problem is not None:
                where = f"{path}:{lineno}: {problem}"
                if not skip_bad_lines:
                    raise UserError(where + (f" (use {skip_flag} to count and skip such lines)" if skip_flag else ""))
                skipped += 1
                first_problem = first_problem or where
                if skipped <= 5:
                    log.warning("skipping %s", where)
                continue
            for stray in other_spellings(obj, required, optional):
                strays.setdefault(stray, [lineno, 0])[1] += 1
            for name, alpaca in alpaca_read.items():  # both names given: the Alpaca one is not read
                if obj.get(name) is not None and obj.get(alpaca) not in (None, "", obj[name]):
                    shadowed.setdefault((alpaca, name), [lineno, 0])[1] += 1
            for name in optional:  # an optional field given as null is absent
                if name in obj and obj[name] is None:
                    del obj[name]
            if line_key is not None:
                obj[line_key] = lineno
            records.append(obj)
    if not records:
        detail = f"; {skipped} bad line(s) skipped, first: {first_problem}" if skipped else ""
        if not allow_empty:
            raise UserError(f"{path}: no records{detail}")
        log.warning("%s: no records%s", path, detail)
    if skipped:
        log.warning("%s: skipped %d bad line(s) of %d", path, skipped, skipped + len(records))
    for (key, name), (first, lines) in strays.items():
        why = f"Alpaca's '{key}' is our '{name}'" if key == ALPACA_FIELDS.get(name) else f"did you mean '{name}'?"
        log.warning("%s:%d: field '%s' is not read (%s; %d line(s) have it and no '%s'): rename it to '%s' if it "
                    "holds that text", path, first, key, why, lines, name, name)
    for (key, name), (first, lines) in shadowed.items():
        log.warning("%s:%d: field '%s' is not read (Alpaca's '%s' is our '%s'; %d line(s) have both, with other "
                    "text): only '%s' is read", path, first, key, key, name, lines, name)
    return records, skipped


def decode_utf8(path: str, data: bytes) -> str:
    """``data`` as text (a leading UTF-8 BOM dropped); bytes that are not UTF-8 raise ``UserError`` naming
    ``path:line``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        line = data.count(b"\n", 0, e.start + start) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start + start]:02x})") from None


def read_text_documents(path: str, split_on_blank_lines: bool = False) -> list[dict]:
    """``{"text", "source"}`` records of a plain-text file: ONE document per file by default.

    Clinical notes have blank lines between their sections, so splitting on blank lines would cut notes apart;
    pass ``split_on_blank_lines=True`` for files that hold one short document per paragraph.
    An empty (whitespace-only) file raises ``UserError``; bytes that are not UTF-8 raise naming the line. Windows
    line ends (CRLF) become ``\\n``: they are the file's, not the note's (a JSONL value's text is kept as written).
    """
    require_file(path)
    with open(path, "rb") as f:
        text = decode_utf8(path, f.read())
    text = text.replace("\r\n", "\n")
    if split_on_blank_lines:
        docs = [p.strip() for p in text.split("\n\n")]
        docs = [d for d in docs if d]
    else:
        docs = [text.strip()] if text.strip() else []
    if not docs:
        raise UserError(f"{path}: no records (the file is empty)")
    return [{"text": d, "source": path} for d in docs]


def expand_paths(path_or_glob: str) -> list[str]:
    """Sorted files named by a path, a glob (``**`` reaches into subfolders), or a directory (its own ``.jsonl`` and
    ``.txt`` files, any case; its other files and its subfolders are named in a warning, not read: a run folder or a
    held-out split kept beside the notes is not training data). A leading ``~`` is the home folder."""
    path_or_glob = os.path.expanduser(os.fspath(path_or_glob))
    if os.path.isdir(path_or_glob):
        entries = sorted(n for n in os.listdir(path_or_glob) if not n.startswith("."))
        names = [n for n in entries if os.path.isfile(os.path.join(path_or_glob, n))]
        files = [os.path.join(path_or_glob, n) for n in names if n.lower().endswith(SUPPORTED_EXTENSIONS)]
        ignored = [n for n in names if not n.lower().endswith(SUPPORTED_EXTENSIONS)]
        if ignored:
            log.warning("%s: ignored %d file(s) that are not %s: %s%s", path_or_glob, len(ignored),
                        " or ".join(SUPPORTED_EXTENSIONS), ", ".join(ignored[:5]), ", ..." if len(ignored) > 5 else "")
        folders = [n for n in entries if os.path.isdir(os.path.join(path_or_glob, n))]
        if folders:
            log.warning("%s: subfolder(s) not read: %s%s (name them, or use a glob such as %s)", path_or_glob,
                        ", ".join(folders[:5]), ", ..." if len(folders) > 5 else "",
                        os.path.join(path_or_glob, "**", "*.jsonl"))
    elif os.path.isfile(path_or_glob):  # before the glob: a file may be named "notes[1].jsonl"
        files = [path_or_glob]
    elif any(c in path_or_glob for c in "*?["):
        files = [p for p in glob.glob(path_or_glob, recursive=True) if os.path.isfile(p)]
    else:
        raise UserError(f"{path_or_glob}: no such file")
    if not files:
        raise UserError(f"{path_or_glob}: matches no .jsonl or .txt files")
    return sorted(files)


def _text_field_problem(text_field: str, record: Any) -> str | None:
    """A record without ``text_field``: the config key that would read its text (``data.text_field``)."""
    if not isinstance(record, dict) or text_field in record:
        return None
    texts = [k for k, v in record.items() if isinstance(v, str) and v.strip()]
    if not texts:
        return None  # the usual "missing field" message
    best = max(texts, key=lambda k: len(record[k]))
    return (f"missing field '{text_field}' (the text field is set by data.text_field: data.text_field={best} "
            f"reads '{best}'; this record's text fields: {', '.join(texts)})")


def read_documents(path_or_glob: str, skip_bad_lines: bool = False, *, text_field: str = "text",
                   split_on_blank_lines: bool = False, seen: dict[str, str] | None = None) -> tuple[list[dict], int]:
    """``{"text", "source"}`` documents from ``.jsonl`` (field ``text_field``) and ``.txt`` files, and skipped lines.

    ``path_or_glob`` may be a file, a glob (``notes/*.jsonl``) or a directory. ``source`` is the file path. A JSONL
    line whose text is empty (or only whitespace) is a bad line: a document of nothing would train BOS → EOS. With
    ``skip_bad_lines`` a file of nothing but bad lines is counted and skipped too. ``seen`` (real path → the spec
    that named it, shared by the calls for one corpus): a file named twice is an error, not read twice.
    """
    docs: list[dict] = []
    skipped = 0
    for path in expand_paths(path_or_glob):
        if seen is not None:
            real = os.path.realpath(path)
            if real in seen:
                raise UserError(f"{path} is named twice in the data sources ({seen[real]!r} and {path_or_glob!r}): "
                                f"it would be read twice (its documents counted twice, and the same document could "
                                f"be both trained on and held out); name each file once")
            seen[real] = path_or_glob
        ext = os.path.splitext(path)[1].lower()
        if ext == ".jsonl":
            records, n_bad = read_jsonl(path, {text_field: str}, skip_bad_lines, nonempty=(text_field,),
                                        allow_empty=skip_bad_lines, check=partial(_text_field_problem, text_field))
            docs.extend({"text": r[text_field], "source": path} for r in records)
            skipped += n_bad
        elif ext == ".txt":  # one document per file: a bad file is skipped whole, counted as one bad line
            try:
                docs.extend(read_text_documents(path, split_on_blank_lines))
            except UserError as e:
                if not skip_bad_lines:
                    raise UserError(f"{e} (use --skip-bad-lines to count and skip such files)") from None
                log.warning("skipping %s (the whole file)", e)
                skipped += 1
        else:
            raise UserError(f"{path}: unsupported file type '{ext}'{suggest(ext, SUPPORTED_EXTENSIONS)}; "
                            f"use one of {', '.join(SUPPORTED_EXTENSIONS)}")
    if not docs:
        raise UserError(f"{path_or_glob}: no documents ({skipped} bad line(s) skipped)")
    return docs, skipped
