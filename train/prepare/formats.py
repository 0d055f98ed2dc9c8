"""Load supervised fine-tuning data in the formats people already have into canonical `Record`s.

Supported inputs (see `FORMATS`):

- ``prompt_completion``: OpenAI legacy ``{"prompt", "completion"}`` rows; the legacy prompt
  separator and completion stop marker are stripped when (nearly) every row uses them.
- ``chat``: OpenAI ``{"messages": [...]}`` rows, including per-turn ``weight``, tool calls,
  and LLaMA-Factory v1 typed content parts with per-turn ``loss_weight``.
- ``alpaca``: ``instruction`` / ``input`` / ``output`` (+ ``system``, ``history``).
- ``sharegpt``: ``conversations`` of ``{"from", "value"}`` turns, with function calls,
  observations and a ``tools`` list (often a JSON string).
- ``csv``: a CSV/TSV file with a header row and question/answer columns.
- ``llamafactory_registry``: a LLaMA-Factory ``dataset_info.json``; every listed dataset whose
  file lies next to it is loaded with its column mapping.

JSON arrays and JSONL are both accepted for the record formats; every record knows the
1-based line where it starts. This module only converts: rows that cannot be converted are
skipped and reported as error `Problem`s, and nothing is normalised or validated beyond that.
`FormatError` is raised only for a file that cannot be read as a whole.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedesk.chat_format import ToolsError, normalize_tools, one_system_turn_first

from .records import Problem, Record

__all__ = ["FORMATS", "FormatError", "LoadResult", "Problem", "Record", "load_file"]

FORMATS = (
    "prompt_completion",
    "chat",
    "alpaca",
    "sharegpt",
    "csv",
    "llamafactory_registry",
)
RECORD_FORMATS = ("prompt_completion", "chat", "alpaca", "sharegpt")

PROMPT_SEPARATORS = ("\n\n###\n\n", " ->", "->", "\n\n", "###")
COMPLETION_STOPS = (" END", "END", "\n###", "###")
NEARLY_ALL = 0.9  # share of rows that must share a legacy separator/stop for it to be stripped

CSV_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
QUESTION_COLUMNS = ("question", "prompt", "q", "instruction", "input", "问题")
ANSWER_COLUMNS = ("answer", "completion", "a", "output", "response", "回答", "答案")
SYSTEM_COLUMNS = ("system", "system_prompt")

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_SCALARS = (str, int, float, bool)


class FormatError(Exception):
    """A file that cannot be read as a whole; the message names the file."""


@dataclass
class LoadResult:
    records: list[Record]
    problems: list[Problem]
    format: str
    rows_read: int


class _Bad(Exception):
    """One row cannot be converted (internal: becomes an error Problem)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


@dataclass(frozen=True)
class _Spec:
    """Column names and role tags (LLaMA-Factory registry mappings override the defaults)."""

    messages: str | None = None  # chat/sharegpt turn list; None: "messages"/"conversations"
    system: str | None = "system"
    tools: str | None = "tools"
    prompt: str = "instruction"
    query: str = "input"
    response: str = "output"
    history: str | None = "history"
    role_tag: str = "from"
    content_tag: str = "value"
    tags: tuple[tuple[str, str], ...] = ()  # sharegpt (source role name, canonical role)


_DEFAULT_SPEC = _Spec()
_Warnings = list[tuple[str, str, str | None]]
_Converter = Callable[[dict, _Warnings], tuple[list[dict], list[dict] | None, dict]]


# ----------------------------------------------------------------------------------------------
# Public entry point


def load_file(
    path: str | Path,
    fmt: str | None = None,
    *,
    question_col: str | None = None,
    answer_col: str | None = None,
    system_col: str | None = None,
) -> LoadResult:
    """Load one data file into canonical records plus the problems found on the way.

    `fmt` (one of `FORMATS`) overrides auto-detection; the CSV column options apply to CSV/TSV
    input only. Raises `FormatError` only when the file cannot be read as a whole.
    """
    if fmt is not None and fmt not in FORMATS:
        raise FormatError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    cols = (question_col, answer_col, system_col)
    with _gc_paused():
        return _load(Path(path), str(path), fmt, _DEFAULT_SPEC, cols)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many small acyclic objects (halves load time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load(
    path: Path, name: str, fmt: str | None, spec: _Spec, cols: tuple[str | None, ...]
) -> LoadResult:
    text = _read_text(path, name)
    suffix = path.suffix.lower()
    if fmt == "csv" or (fmt is None and suffix in CSV_SUFFIXES):
        return _load_csv(text, name, suffix, *cols)
    if suffix in CSV_SUFFIXES:  # an explicit record format on a CSV file: rows become dicts
        header, rows = _csv_table(text, name, suffix)
        dict_rows: list[tuple[int, Any]] = [
            (ln, dict(zip(header, row, strict=False))) for ln, row in rows
        ]
        return _finish(dict_rows, len(rows), [], name, fmt, spec)
    return _load_json(path, text, name, suffix, fmt, spec)


def _read_text(path: Path, name: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"{name}: no such file") from None
    except OSError as e:
        raise FormatError(f"{name}: cannot read file: {e.strerror or e}") from None
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise FormatError(f"{name}:{line}: not valid {encoding} text ({e.reason})") from None


# ----------------------------------------------------------------------------------------------
# JSON / JSONL containers


def _load_json(
    path: Path, text: str, name: str, suffix: str, fmt: str | None, spec: _Spec
) -> LoadResult:
    start = _WS.match(text).end()
    if start == len(text):
        empty = Problem("warning", "empty_file", "the file contains no records", name)
        return LoadResult([], [empty], fmt or "unknown", 0)
    first = text[start]
    problems: list[Problem] = []
    if first == "[" and suffix not in JSONL_SUFFIXES:
        if fmt == "llamafactory_registry":
            raise FormatError(f"{name}: a dataset registry must be a JSON object, not an array")
        rows: list[tuple[int, Any]] = _scan_array(text, name, start)
        return _finish(rows, len(rows), problems, name, fmt, spec)
    if first != "{" and suffix not in JSONL_SUFFIXES:
        line = text.count("\n", 0, start) + 1
        raise FormatError(f"{name}:{line}: not JSON or JSONL (starts with {first!r})")
    whole = _whole_object(text) if suffix not in JSONL_SUFFIXES else None
    if fmt == "llamafactory_registry" or (fmt is None and _is_registry(whole)):
        if not _is_registry(whole):
            raise FormatError(f"{name}: not a LLaMA-Factory dataset_info.json registry")
        return _load_registry(path, text, name, whole)
    if isinstance(whole, dict):  # one (possibly pretty-printed) object
        rows = [(text.count("\n", 0, start) + 1, whole)]
        return _finish(rows, 1, problems, name, fmt, spec)
    rows, rows_read = _scan_jsonl(text, name, problems)
    return _finish(rows, rows_read, problems, name, fmt, spec)


def _whole_object(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _scan_jsonl(text: str, name: str, problems: list[Problem]) -> tuple[list[tuple[int, Any]], int]:
    """Parse one object per physical line; blank lines are skipped but counted."""
    rows: list[tuple[int, Any]] = []
    loads = _DECODER.decode
    n = 0
    for lineno, raw in enumerate(text.split("\n"), 1):
        if not raw or raw.isspace():
            continue
        n += 1
        try:
            rows.append((lineno, loads(raw)))
        except json.JSONDecodeError as e:
            msg = f"invalid JSON: {e.msg} (column {e.colno})"
            problems.append(Problem("error", "bad_json", msg, name, lineno))
        except RecursionError:
            msg = "invalid JSON: nested too deeply"
            problems.append(Problem("error", "bad_json", msg, name, lineno))
    return rows, n


class _Lines:
    """Line numbers of increasing offsets in one text, counted incrementally."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def at(self, offset: int) -> int:
        self.line += self.text.count("\n", self.pos, offset)
        self.pos = offset
        return self.line

    def where(self, offset: int) -> str:
        line = self.at(offset)
        col = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return f"{line}:{col}"


def _decode_at(text: str, idx: int, name: str) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, idx)
    except json.JSONDecodeError as e:
        raise FormatError(f"{name}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise FormatError(f"{name}: invalid JSON: nested too deeply") from None


def _scan_array(text: str, name: str, start: int) -> list[tuple[int, Any]]:
    """Parse a top-level JSON array element by element, remembering each element's line."""
    lines = _Lines(text)
    rows: list[tuple[int, Any]] = []
    idx = _WS.match(text, start + 1).end()
    if text.startswith("]", idx):
        return _expect_end(text, name, idx + 1, lines, rows)
    while True:
        obj, end = _decode_at(text, idx, name)
        rows.append((lines.at(idx), obj))
        idx = _WS.match(text, end).end()
        sep = text[idx : idx + 1]
        if sep == "]":
            return _expect_end(text, name, idx + 1, lines, rows)
        if sep != ",":
            found = repr(sep) if sep else "end of file"
            raise FormatError(f"{name}:{lines.where(idx)}: expected ',' or ']', found {found}")
        idx = _WS.match(text, idx + 1).end()


def _expect_end(
    text: str, name: str, idx: int, lines: _Lines, rows: list[tuple[int, Any]]
) -> list[tuple[int, Any]]:
    idx = _WS.match(text, idx).end()
    if idx != len(text):
        raise FormatError(f"{name}:{lines.where(idx)}: unexpected data after the JSON array")
    return rows


def _object_key_lines(text: str) -> dict[str, int]:
    """Line of each top-level key of a JSON object text already known to be valid."""
    lines = _Lines(text)
    found: dict[str, int] = {}
    idx = _WS.match(text, _WS.match(text).end() + 1).end()
    while idx < len(text) and text[idx] == '"':
        key, end = _DECODER.raw_decode(text, idx)
        found[key] = lines.at(idx)
        idx = _WS.match(text, _WS.match(text, end).end() + 1).end()  # skip ':'
        _, end = _DECODER.raw_decode(text, idx)
        idx = _WS.match(text, end).end()
        if not text.startswith(",", idx):
            break
        idx = _WS.match(text, idx + 1).end()
    return found


# ----------------------------------------------------------------------------------------------
# Rows -> records


def detect_format(row: dict) -> str | None:
    """The record format a row's keys indicate, or None."""
    if "messages" in row:
        msgs = row["messages"]
        first = msgs[0] if isinstance(msgs, list) and msgs else None
        if isinstance(first, dict) and "from" in first and "role" not in first:
            return "sharegpt"
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def _finish(
    rows: list[tuple[int, Any]],
    rows_read: int,
    problems: list[Problem],
    name: str,
    fmt: str | None,
    spec: _Spec,
) -> LoadResult:
    auto = fmt is None
    if auto:
        fmt = next((f for _, r in rows if isinstance(r, dict) and (f := detect_format(r))), None)
    if fmt is None:
        records: list[Record] = []
        _report_unknown(rows, name, problems)
    else:
        records = _convert_rows(rows, name, fmt, spec, auto, problems)
    if rows_read == 0:
        problems.append(Problem("warning", "empty_file", "the file contains no records", name))
    problems.sort(key=lambda p: p.line or 0)
    return LoadResult(records, problems, fmt or "unknown", rows_read)


def _report_unknown(rows: list[tuple[int, Any]], name: str, problems: list[Problem]) -> None:
    for line, row in rows:
        if not isinstance(row, dict):
            problems.append(_not_object(row, name, line))
            continue
        keys = ", ".join(repr(k) for k in list(row)[:8]) or "none"
        msg = (
            f"cannot tell the format from the keys ({keys}); expected 'messages' (chat), "
            "'conversations' (sharegpt), 'instruction'+'output' (alpaca) or "
            "'prompt'+'completion' (prompt_completion)"
        )
        problems.append(Problem("error", "unknown_format", msg, name, line))


def _not_object(row: Any, name: str, line: int) -> Problem:
    msg = f"record must be a JSON object, got {_typename(row)}"
    return Problem("error", "not_object", msg, name, line)


def _convert_rows(
    rows: list[tuple[int, Any]],
    name: str,
    fmt: str,
    spec: _Spec,
    auto: bool,
    problems: list[Problem],
) -> list[Record]:
    convert = _make_converter(fmt, spec, [r for _, r in rows if isinstance(r, dict)])
    records: list[Record] = []
    warns: _Warnings = []
    for line, row in rows:
        if not isinstance(row, dict):
            problems.append(_not_object(row, name, line))
            continue
        if auto and (seen := detect_format(row)) is not None and seen != fmt:
            msg = f"record looks like {seen} but the file is {fmt} (decided by its first record)"
            problems.append(Problem("error", "format_mismatch", msg, name, line))
            continue
        try:
            messages, tools, meta = convert(row, warns)
        except _Bad as bad:
            problems.append(Problem("error", bad.code, bad.message, name, line, bad.field))
            messages = None
        if warns:
            problems.extend(Problem("warning", c, m, name, line, f) for c, m, f in warns)
            warns.clear()
        if messages is not None:
            records.append(Record(messages, name, line, tools, meta))
    return records


def _make_converter(fmt: str, spec: _Spec, rows: list[dict]) -> _Converter:
    if fmt == "prompt_completion":
        return _prompt_completion_converter(rows)
    if fmt == "chat":
        return _chat_converter(spec)
    if fmt == "alpaca":
        return _alpaca_converter(spec)
    if fmt == "sharegpt":
        return _sharegpt_converter(spec)
    raise FormatError(f"format {fmt!r} is not a record format")  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# Field helpers


def _typename(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _req(obj: dict, key: str, field: str | None = None) -> Any:
    field = field or key
    if key not in obj:
        raise _Bad("missing_field", f"field '{field}' is missing", field)
    value = obj[key]
    if value is None:
        raise _Bad("missing_field", f"field '{field}' is null", field)
    return value


def _req_str(obj: dict, key: str, field: str | None = None) -> str:
    value = _req(obj, key, field)
    if not isinstance(value, str):
        field = field or key
        raise _Bad("bad_type", f"field '{field}' must be a string, got {_typename(value)}", field)
    return value


def _opt_str(obj: dict, key: str | None, field: str | None = None) -> str | None:
    if key is None or obj.get(key) is None:
        return None
    return _req_str(obj, key, field)


def _req_list(obj: dict, key: str) -> list:
    value = _req(obj, key)
    if not isinstance(value, list):
        raise _Bad("bad_type", f"field '{key}' must be an array, got {_typename(value)}", key)
    return value


def _meta(obj: dict, standard: frozenset[str]) -> dict:
    """Non-standard scalar keys of a source row, passed through."""
    if obj.keys() <= standard:
        return {}
    return {
        k: v for k, v in obj.items() if k not in standard and (v is None or isinstance(v, _SCALARS))
    }


def _args_text(args: Any, field: str) -> str:
    """A call's arguments as OpenAI's JSON text. They must be a JSON object (inline or as
    text): the template is handed them as one, and anything else would be trained as `{}`."""
    if args is None or (isinstance(args, str) and not args.strip()):
        return "{}"
    parsed = args
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except ValueError as e:
            msg = f"field '{field}' is not valid JSON: {getattr(e, 'msg', e)}"
            raise _Bad("bad_tool_call", msg, field) from None
    if not isinstance(parsed, dict):
        msg = f"field '{field}' must be a JSON object of arguments, got {_typename(parsed)}"
        raise _Bad("bad_tool_call", msg, field)
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _parse_tools(value: Any, field: str) -> list[dict] | None:
    """A tools list (JSON text or list) in the shape serving renders (chat_format.normalize_tools)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            msg = f"field '{field}' is not valid JSON: {getattr(e, 'msg', e)}"
            raise _Bad("bad_tools", msg, field) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        msg = f"field '{field}' must be a list of tool objects, got {_typename(value)}"
        raise _Bad("bad_tools", msg, field)
    if not value:
        return None
    try:
        return normalize_tools(value, field)
    except ToolsError as e:
        raise _Bad("bad_tools", f"field '{e.field}': {e}", e.field) from None


def _content(value: Any, field: str) -> str:
    """A message content as str; typed text parts joined by newlines, as serving joins them
    (and vLLM, for templates that take a string), so a conversation trains as it is served."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        msg = f"field '{field}' must be a string or a list of text parts, got {_typename(value)}"
        raise _Bad("bad_type", msg, field)
    texts = []
    for j, part in enumerate(value):
        if isinstance(part, str):
            texts.append(part)
            continue
        pf = f"{field}[{j}]"
        if not isinstance(part, dict):
            raise _Bad("bad_type", f"field '{pf}' must be an object, got {_typename(part)}", pf)
        kind = part.get("type", "text")
        if kind != "text":
            msg = f"field '{pf}.type' is {kind!r}; only text content can be converted"
            raise _Bad("bad_content", msg, f"{pf}.type")
        text = part.get("text", part.get("value"))
        if not isinstance(text, str):
            msg = f"field '{pf}' needs a string 'text' or 'value', got {_typename(text)}"
            raise _Bad("bad_type", msg, pf)
        texts.append(text)
    return "\n".join(texts)


# ----------------------------------------------------------------------------------------------
# prompt_completion (OpenAI legacy)


def _common_suffix(values: list[str], candidates: tuple[str, ...]) -> str | None:
    """The first candidate that (nearly) every value ends with."""
    if not values:
        return None
    need = NEARLY_ALL * len(values)
    for cand in candidates:
        if sum(1 for v in values if v.endswith(cand)) >= need:
            return cand
    return None


def _trim_completion(text: str) -> str:
    return (text[1:] if text.startswith(" ") else text).rstrip()


class _Legacy:
    """OpenAI legacy conventions shared by a file's prompts and completions."""

    def __init__(self, prompts: list[str], completions: list[str]) -> None:
        self.sep = _common_suffix(prompts, PROMPT_SEPARATORS)
        self.stop = _common_suffix([_trim_completion(c) for c in completions], COMPLETION_STOPS)

    def prompt(self, text: str) -> str:
        sep = self.sep
        return text[: -len(sep)] if sep and text.endswith(sep) else text

    def completion(self, text: str) -> str:
        text = _trim_completion(text)
        stop = self.stop
        return text[: -len(stop)].rstrip() if stop and text.endswith(stop) else text


_PC_KEYS = frozenset({"prompt", "completion", "system"})


def _prompt_completion_converter(rows: list[dict]) -> _Converter:
    prompts = [p for r in rows if isinstance(p := r.get("prompt"), str)]
    completions = [c for r in rows if isinstance(c := r.get("completion"), str)]
    legacy = _Legacy(prompts, completions)
    sep, stop = legacy.sep, legacy.stop  # _Legacy.prompt/.completion inlined: the hot path

    def convert(row: dict, warns: _Warnings) -> tuple[list[dict], None, dict]:
        prompt = row.get("prompt")
        completion = row.get("completion")
        if prompt.__class__ is not str:
            prompt = _req_str(row, "prompt")
        if completion.__class__ is not str:
            completion = _req_str(row, "completion")
        if sep and prompt.endswith(sep):
            prompt = prompt[: -len(sep)]
        completion = (completion[1:] if completion[:1] == " " else completion).rstrip()
        if stop and completion.endswith(stop):
            completion = completion[: -len(stop)].rstrip()
        user = {"role": "user", "content": prompt}
        assistant = {"role": "assistant", "content": completion}
        system = row.get("system")
        if system is None or system == "":
            messages = [user, assistant]
        else:
            messages = [{"role": "system", "content": _req_str(row, "system")}, user, assistant]
        return messages, None, _meta(row, _PC_KEYS)

    return convert


# ----------------------------------------------------------------------------------------------
# chat (OpenAI messages, LLaMA-Factory v1)

CHAT_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}


def _chat_converter(spec: _Spec) -> _Converter:
    key = spec.messages or "messages"
    tools_key = spec.tools or "tools"
    standard = frozenset({key, tools_key, "functions", "parallel_tool_calls"})

    def convert(row: dict, warns: _Warnings) -> tuple[list[dict], list[dict] | None, dict]:
        turns = _req_list(row, key)
        messages = [_chat_message(m, f"{key}[{i}]", warns) for i, m in enumerate(turns)]
        if any(isinstance(m, dict) and m.get("role") == "developer" for m in turns):
            merged = one_system_turn_first(messages)  # as such a conversation is served
            if merged is not messages:
                msg = "developer and system turns merged into one first system turn, as served"
                warns.append(("merged_system_turns", msg, key))
            messages = merged
        if row.get(tools_key) is not None:
            tools = _parse_tools(row[tools_key], tools_key)
        else:
            tools = _parse_tools(row.get("functions"), "functions")
        return messages, tools, _meta(row, standard)

    return convert


def _chat_message(m: Any, f: str, warns: _Warnings) -> dict:
    if not isinstance(m, dict):
        raise _Bad("bad_type", f"field '{f}' must be an object, got {_typename(m)}", f)
    raw_role = _req(m, "role", f"{f}.role")
    role = CHAT_ROLES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        msg = (
            f"field '{f}.role' is {raw_role!r}; expected system, user, assistant or tool "
            "(or developer/function)"
        )
        raise _Bad("bad_role", msg, f"{f}.role")
    calls = _chat_tool_calls(m, f) if role == "assistant" else None
    content = m.get("content")
    if content is None and calls:
        content = ""
    elif content is None:
        _req(m, "content", f"{f}.content")
    msg_out: dict = {"role": role, "content": _content(content, f"{f}.content")}
    if role == "assistant":
        weight = _chat_weight(m, f, warns)
        if weight is not None:
            msg_out["weight"] = weight
        if calls:
            msg_out["tool_calls"] = calls
    elif role == "tool":
        for k in ("tool_call_id", "name"):
            if isinstance(m.get(k), str):
                msg_out[k] = m[k]
    return msg_out


def _chat_weight(m: dict, f: str, warns: _Warnings) -> int | None:
    if "weight" in m:
        w = m["weight"]
        if isinstance(w, (int, float)) and w in (0, 1):
            return int(w)
        msg = f"field '{f}.weight' must be 0 or 1, got {w!r}"
        raise _Bad("bad_weight", msg, f"{f}.weight")
    if "loss_weight" in m:
        lw = m["loss_weight"]
        if not isinstance(lw, (int, float)):
            msg = f"field '{f}.loss_weight' must be a number, got {_typename(lw)}"
            raise _Bad("bad_weight", msg, f"{f}.loss_weight")
        if lw not in (0, 1):
            msg = f"field '{f}.loss_weight' is {lw!r}; only 0 or 1 is kept, so it counts as 1"
            warns.append(("fractional_weight", msg, f"{f}.loss_weight"))
        return 0 if lw == 0 else 1
    return None


def _chat_tool_calls(m: dict, f: str) -> list[dict] | None:
    raw = m.get("tool_calls")
    if raw is None and isinstance(m.get("function_call"), dict):  # legacy OpenAI
        raw = [{"type": "function", "function": m["function_call"]}]
        f_calls = f"{f}.function_call"
    else:
        f_calls = f"{f}.tool_calls"
    if raw is None:
        return None
    if not isinstance(raw, list):
        msg = f"field '{f_calls}' must be an array, got {_typename(raw)}"
        raise _Bad("bad_tool_call", msg, f_calls)
    return [_chat_tool_call(c, f"{f_calls}[{k}]", k) for k, c in enumerate(raw)]


def _chat_tool_call(call: Any, f: str, k: int) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        msg = f"field '{f}' must be an object with a 'function' that has a string 'name'"
        raise _Bad("bad_tool_call", msg, f)
    call_id = call.get("id")
    return {
        "id": call_id if isinstance(call_id, str) else f"call_{k}",
        "type": "function",
        "function": {
            "name": fn["name"],
            "arguments": _args_text(fn.get("arguments"), f"{f}.function.arguments"),
        },
    }


# ----------------------------------------------------------------------------------------------
# alpaca


def _alpaca_converter(spec: _Spec) -> _Converter:
    cols = (spec.prompt, spec.query, spec.response, spec.system, spec.history, spec.tools)
    standard = frozenset(c for c in cols if c)

    def convert(row: dict, warns: _Warnings) -> tuple[list[dict], list[dict] | None, dict]:
        instruction = _req_str(row, spec.prompt)
        output = _req_str(row, spec.response)
        extra = _opt_str(row, spec.query)
        if extra and extra.strip():
            user = f"{instruction}\n\n{extra}" if instruction.strip() else extra
        else:
            user = instruction
        system = _opt_str(row, spec.system)
        messages = [{"role": "system", "content": system}] if system else []
        if spec.history and row.get(spec.history) is not None:
            messages.extend(_alpaca_history(row[spec.history], spec.history))
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": output})
        tools = _parse_tools(row.get(spec.tools), spec.tools) if spec.tools else None
        return messages, tools, _meta(row, standard)

    return convert


def _alpaca_history(history: Any, key: str) -> list[dict]:
    if not isinstance(history, list):
        msg = f"field '{key}' must be an array of [question, answer] pairs"
        raise _Bad("bad_type", msg, key)
    turns: list[dict] = []
    for i, pair in enumerate(history):
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        if not ok:
            msg = f"field '{key}[{i}]' must be a [question, answer] pair of strings"
            raise _Bad("bad_type", msg, f"{key}[{i}]")
        turns.append({"role": "user", "content": pair[0]})
        turns.append({"role": "assistant", "content": pair[1]})
    return turns


# ----------------------------------------------------------------------------------------------
# sharegpt

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
}


def _sharegpt_converter(spec: _Spec) -> _Converter:
    roles = {**SHAREGPT_ROLES, **dict(spec.tags)}
    standard = frozenset(c for c in ("conversations", "messages", spec.system, spec.tools) if c)

    def convert(row: dict, warns: _Warnings) -> tuple[list[dict], list[dict] | None, dict]:
        key = spec.messages or ("messages" if _messages_only(row) else "conversations")
        turns = _req_list(row, key)
        system = _opt_str(row, spec.system)
        messages = [{"role": "system", "content": system}] if system else []
        pending: list[tuple[str, str]] = []  # (id, name) of calls not yet answered
        n_calls = 0
        for i, turn in enumerate(turns):
            role, value = _sharegpt_turn(turn, f"{key}[{i}]", spec, roles)
            if role == "function_call":
                calls = _parse_call_value(value, f"{key}[{i}]", n_calls)
                n_calls += len(calls)
                pending = [(c["id"], c["function"]["name"]) for c in calls]
                messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            elif role == "tool":
                msg = {"role": "tool", "content": value}
                if pending:
                    msg["tool_call_id"], msg["name"] = pending.pop(0)
                messages.append(msg)
            else:
                pending = []
                messages.append({"role": role, "content": value})
        tools = _parse_tools(row.get(spec.tools), spec.tools) if spec.tools else None
        return messages, tools, _meta(row, standard | {key})

    return convert


def _messages_only(row: dict) -> bool:
    return "messages" in row and "conversations" not in row


def _sharegpt_turn(turn: Any, f: str, spec: _Spec, roles: dict[str, str]) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise _Bad("bad_type", f"field '{f}' must be an object, got {_typename(turn)}", f)
    role_key = spec.role_tag if spec.role_tag in turn or "role" not in turn else "role"
    content_key = spec.content_tag
    if content_key not in turn and "content" in turn:
        content_key = "content"
    raw = _req(turn, role_key, f"{f}.{role_key}")
    role = roles.get(raw) if isinstance(raw, str) else None
    if role is None:
        known = ", ".join(sorted(roles))
        msg = f"field '{f}.{role_key}' is {raw!r}; expected one of {known}"
        raise _Bad("bad_role", msg, f"{f}.{role_key}")
    value = turn.get(content_key)
    if isinstance(value, list):
        return role, _content(value, f"{f}.{content_key}")
    return role, _req_str(turn, content_key, f"{f}.{content_key}")


def _parse_call_value(value: str, f: str, first_id: int) -> list[dict]:
    """A sharegpt function_call value: JSON {"name", "arguments"} (or a list of them)."""
    try:
        parsed = json.loads(value)
    except ValueError as e:
        msg = f"field '{f}' is a function_call whose value is not JSON: {getattr(e, 'msg', e)}"
        raise _Bad("bad_tool_call", msg, f) from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        raise _Bad("bad_tool_call", f"field '{f}' is a function_call with no call", f)
    calls = []
    for k, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            msg = f"field '{f}' must hold a JSON object with a string 'name' and 'arguments'"
            raise _Bad("bad_tool_call", msg, f)
        key = "arguments" if "arguments" in item else "parameters"
        function = {"name": item["name"], "arguments": _args_text(item.get(key), f"{f}.{key}")}
        calls.append({"id": f"call_{first_id + k}", "type": "function", "function": function})
    return calls


# ----------------------------------------------------------------------------------------------
# CSV / TSV


def _csv_table(text: str, name: str, suffix: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (start line, cells) of every non-blank data row."""
    first_line = text.split("\n", 1)[0]
    tabbed = "\t" in first_line and "," not in first_line
    delimiter = "\t" if suffix == ".tsv" or tabbed else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    prev = 0
    try:
        for row in reader:
            start, prev = prev + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = row
            else:
                rows.append((start, row))
    except csv.Error as e:
        raise FormatError(f"{name}:{reader.line_num}: bad CSV: {e}") from None
    if header is None:
        raise FormatError(f"{name}: no header row")
    return header, rows


def _pick_column(
    header: list[str], given: str | None, candidates: tuple[str, ...], what: str, name: str
) -> int | None:
    if given is not None:
        for i, h in enumerate(header):
            if h == given or h.strip().lower() == given.strip().lower():
                return i
        raise FormatError(f"{name}: {what} column {given!r} not in header {header}")
    keys = [h.strip().lower() for h in header]
    for cand in candidates:
        if cand in keys:
            return keys.index(cand)
    return None


def _load_csv(
    text: str,
    name: str,
    suffix: str,
    question_col: str | None,
    answer_col: str | None,
    system_col: str | None,
) -> LoadResult:
    header, rows = _csv_table(text, name, suffix)
    q = _pick_column(header, question_col, QUESTION_COLUMNS, "question", name)
    a = _pick_column(header, answer_col, ANSWER_COLUMNS, "answer", name)
    s = _pick_column(header, system_col, SYSTEM_COLUMNS, "system", name)
    if q is None or a is None or q == a:
        raise FormatError(
            f"{name}: needs a question and an answer column (header: {header}); "
            f"question is one of {QUESTION_COLUMNS}, answer one of {ANSWER_COLUMNS}, "
            "or pass question_col/answer_col"
        )
    keys = [h.strip().lower() for h in header]
    extra = None  # alpaca-style CSV: instruction + input
    if question_col is None and keys[q] == "instruction" and "input" in keys:
        extra = keys.index("input")
    legacy = None
    if keys[q] == "prompt" and keys[a] == "completion":
        legacy = _Legacy(
            [r[q] for _, r in rows if q < len(r)], [r[a] for _, r in rows if a < len(r)]
        )
    used = {i for i in (q, a, s, extra) if i is not None}
    records: list[Record] = []
    problems: list[Problem] = []
    for line, row in rows:
        if max(q, a) >= len(row):
            col = header[q] if q >= len(row) else header[a]
            msg = f"field '{col}' is missing (the row has only {len(row)} cells)"
            problems.append(Problem("error", "missing_field", msg, name, line, col))
            continue
        messages = _csv_messages(row, q, a, s, extra, legacy)
        meta = {header[i]: row[i] for i in range(min(len(header), len(row))) if i not in used}
        records.append(Record(messages, name, line, None, meta))
    if not rows:
        problems.append(Problem("warning", "empty_file", "the file contains no records", name))
    return LoadResult(records, problems, "csv", len(rows))


def _csv_messages(
    row: list[str], q: int, a: int, s: int | None, extra: int | None, legacy: _Legacy | None
) -> list[dict]:
    question, answer = row[q], row[a]
    if extra is not None and extra < len(row) and row[extra].strip():
        question = f"{question}\n\n{row[extra]}" if question.strip() else row[extra]
    if legacy is not None:
        question, answer = legacy.prompt(question), legacy.completion(answer)
    system = row[s] if s is not None and s < len(row) else ""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    messages.append({"role": "assistant", "content": answer})
    return messages


# ----------------------------------------------------------------------------------------------
# LLaMA-Factory dataset_info.json

_SOURCE_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")
_SOURCE_KEYS += ("cloud_file_name",)
_LOADABLE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv")
_TAG_ROLES = (
    ("user_tag", "user"),
    ("assistant_tag", "assistant"),
    ("observation_tag", "tool"),
    ("function_tag", "function_call"),
    ("system_tag", "system"),
)


def _is_registry(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(v, dict) and any(k in v for k in _SOURCE_KEYS) for v in obj.values())
    )


def _load_registry(path: Path, text: str, name: str, registry: dict) -> LoadResult:
    key_lines = _object_key_lines(text)
    records: list[Record] = []
    problems: list[Problem] = []
    rows_read = 0
    for ds_name, entry in registry.items():
        line = key_lines.get(ds_name)
        try:
            result = _load_dataset(path.parent, name, ds_name, entry)
        except _Bad as bad:
            severity = "error" if bad.code == "bad_file" else "warning"
            problems.append(Problem(severity, bad.code, bad.message, name, line, ds_name))
            continue
        for record in result.records:
            record.meta.setdefault("dataset", ds_name)
        records.extend(result.records)
        problems.extend(result.problems)
        rows_read += result.rows_read
    return LoadResult(records, problems, "llamafactory_registry", rows_read)


def _load_dataset(base: Path, name: str, ds_name: str, entry: dict) -> LoadResult:
    """Load one registry entry; a skipped entry raises _Bad with the reason."""
    why = _unsupported(entry)
    if why:
        raise _Bad("unsupported_dataset", f"dataset '{ds_name}' skipped: {why}")
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise _Bad("remote_dataset", f"dataset '{ds_name}' has no local file_name, skipped")
    ds_path = base / file_name
    if not ds_path.is_file():
        msg = f"dataset '{ds_name}': file '{file_name}' not found next to the registry, skipped"
        raise _Bad("missing_file", msg)
    fmt, spec = _registry_spec(entry)
    try:
        return _load(ds_path, str(Path(name).parent / file_name), fmt, spec, (None,) * 3)
    except FormatError as e:
        raise _Bad("bad_file", f"dataset '{ds_name}' could not be read: {e}") from None


def _unsupported(entry: dict) -> str | None:
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        return f"formatting {formatting!r} is not supported (alpaca, sharegpt or openai)"
    if entry.get("ranking"):
        return "ranking (preference) datasets are not supervised fine-tuning data"
    columns = entry.get("columns", {})
    tags = entry.get("tags", {})
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        return "'columns' and 'tags' must be objects"
    media = [c for c in ("images", "videos", "audios") if c in columns]
    if media:
        return f"multimodal datasets ({', '.join(media)}) are not supported"
    if "kto_tag" in columns or "chosen" in columns or "rejected" in columns:
        return "preference (KTO/DPO) datasets are not supervised fine-tuning data"
    file_name = entry.get("file_name")
    if isinstance(file_name, str) and Path(file_name).suffix.lower() not in _LOADABLE_SUFFIXES:
        return f"file type of '{file_name}' is not supported (JSON, JSONL, CSV or TSV)"
    return None


def _registry_spec(entry: dict) -> tuple[str, _Spec]:
    formatting = entry.get("formatting", "alpaca")
    cols = {k: v for k, v in entry.get("columns", {}).items() if isinstance(v, str)}
    tags = {k: v for k, v in entry.get("tags", {}).items() if isinstance(v, str)}
    if formatting == "alpaca":
        spec = _Spec(
            system=cols.get("system", "system"),
            tools=cols.get("tools", "tools"),
            prompt=cols.get("prompt", "instruction"),
            query=cols.get("query", "input"),
            response=cols.get("response", "output"),
            history=cols.get("history", "history"),
        )
        return "alpaca", spec
    if formatting == "openai":
        return "chat", _Spec(messages=cols.get("messages", "messages"), tools=cols.get("tools"))
    role_map = tuple((tags[k], role) for k, role in _TAG_ROLES if k in tags)
    spec = _Spec(
        messages=cols.get("messages", "conversations"),
        system=cols.get("system", "system"),
        tools=cols.get("tools", "tools"),
        role_tag=tags.get("role_tag", "from"),
        content_tag=tags.get("content_tag", "value"),
        tags=role_map,
    )
    return "sharegpt", spec
