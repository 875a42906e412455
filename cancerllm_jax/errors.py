"""One exception type for every problem a user can fix; CLIs print its message and exit non-zero."""
from __future__ import annotations

import difflib
import errno
import functools
import inspect
import logging
import os
import re
import shlex
import sys


class UserError(Exception):
    """Bad input, config or environment: the message names the file, line or field and what to do."""


class UserValueError(UserError, ValueError):
    """A UserError that is also a ValueError (an API's argument of the right type but a wrong value)."""


class UserTypeError(UserError, TypeError):
    """A UserError that is also a TypeError (an API's argument of the wrong type)."""


class PeerLost(UserError):
    """Another process of a multi-process run died or became unreachable. The CLI prints one line and leaves at once
    (``os._exit``), without JAX's distributed shutdown barrier, which would wait for the dead peer and then abort."""


def import_reference(name: str, purpose: str):
    """Import ``name``, a package of the ``reference`` extra (torch, peft, gguf: the PyTorch side), or raise a
    UserError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{purpose} needs the Python package '{name}', which `pip install -e .` does not install: "
                        "pip install -e '.[reference]' (the tests' '.[test]' includes it)") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM (or a first Ctrl-C), turned into an exception by a training run once it has saved the step it finished
    (``args``: that step, or None when none ran; the signal's name; the run folder); the CLI exits 143 (130 for
    Ctrl-C), as a process killed by that signal does."""


class ChildStopped(KeyboardInterrupt):
    """SIGTERM or Ctrl-C that reached a command while it waited for a child command (``launch_common.run_child``),
    passed on to the child, which stopped as it stops (a training run saves the step it finished); ``args``: the
    signal's name and what the child was. The CLI exits 143 (130 for Ctrl-C)."""


_SEQ_LEN = ("max_seq_len", "block_size")
# names of the same settings in HF TrainingArguments, peft's LoraConfig and other trainers, which difflib misses
ALIASES = {
    "learning_rate": ("lr",), "num_train_epochs": ("epochs",), "num_epochs": ("epochs",), "r": ("rank",),
    "lora_r": ("rank",), "lora_rank": ("rank",), "lora_alpha": ("alpha",), "lora_dropout": ("dropout",),
    "target_modules": ("targets",), "max_grad_norm": ("clip_norm",), "grad_clip": ("clip_norm",),
    "adam_beta1": ("b1",), "adam_beta2": ("b2",), "adam_epsilon": ("eps",), "lr_scheduler_type": ("schedule",),
    "gradient_accumulation_steps": ("grad_accum",), "per_device_train_batch_size": ("batch_size",),
    "train_batch_size": ("batch_size",), "max_steps": ("steps",), "save_steps": ("save_every",),
    "eval_steps": ("eval_every",), "logging_steps": ("log_every",), "save_total_limit": ("keep",),
    "gradient_checkpointing": ("remat",), "torch_dtype": ("dtype",),
    **{k: _SEQ_LEN for k in ("max_seq_len", "max_seq_length", "seq_len", "seq_length", "block_size",
                             "model_max_length", "max_length", "context_length", "cutoff_len")},
}


def suggest(name: str, choices) -> str:
    """' (did you mean X?)' for the valid key another trainer calls ``name`` (HF's ``learning_rate`` → ``lr``) or
    the nearest one by spelling, or ''."""
    choices = list(choices)
    alias = next((c for c in ALIASES.get(name, ()) if c in choices), None)
    close = [alias] if alias else difflib.get_close_matches(name, choices, n=1)
    if not close:  # a misspelt other trainer's name (learning_rat): its alias
        known = [a for a in difflib.get_close_matches(name, list(ALIASES), n=3) if set(ALIASES[a]) & set(choices)]
        close = [next(c for c in ALIASES[known[0]] if c in choices)] if known else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_can_write(path: str, what: str) -> None:
    """Before any work: the file or folder ``path`` can be made where it is named (the nearest folder above it that
    exists takes files); else a ``UserError`` starting with ``what`` (the flag or path the user gave)."""
    parent = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    while not os.path.exists(parent):  # made when written: the nearest folder that exists must take it
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{what}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what}: the folder {parent} cannot be written")


def describe_os_error(e: OSError) -> str:
    """One line for an operating-system error (disk full, permission, missing file) and what to do."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"disk full{where}: free some space or write to another folder, then run again (a training run: "
                f"--resume; it continues from its last complete checkpoint). Results are written under a "
                f"temporary name and renamed when complete, so nothing half-written was left in place")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: choose a folder you can write to ({e.strerror})"
    if e.errno == errno.ENOENT:
        return f"no such file or folder{where}"
    return f"{e.strerror or e}{where}"


# what a full disk or a refused write looks like where a library reports it as text, not as an OSError (Orbax's
# TensorStore layer: RESOURCE_EXHAUSTED ... [os_error_code='28']; safetensors' Rust: "(os error 28)"): the error
# codes, or the system's own words outside any quoted text (a path may hold any words)
_OS_ERROR_TEXT = ((errno.ENOSPC, ("No space left on device", "Disk quota exceeded")),
                  (errno.EROFS, ("Read-only file system",)),
                  (errno.EACCES, ("Permission denied",)))


def os_error_in_text(e: BaseException) -> OSError | None:
    """The ``OSError`` a library's exception reports in its text (a full disk, a read-only or forbidden folder), with
    the first quoted path as its file name; None when it names none."""
    text = str(e)
    unquoted = re.sub(r'"[^"]*"|\'[^\']*\'', "", text)
    for code, words in _OS_ERROR_TEXT:
        if (re.search(rf"\bos error {code}\b|\bos_error_code='{code}'", text)
                or any(w in unquoted for w in words)):
            path = re.search(r'"(/[^"]+)"', text)
            return OSError(code, os.strerror(code), path.group(1) if path else None)
    return None


class _OneLineRecords(logging.Filter):
    """Library log records (Orbax's background threads log through absl) keep their first line, without the
    traceback: the failure also reaches the CLI, which prints it as one line (``--debug`` keeps everything)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            if record.exc_info or record.exc_text or "\n" in message:
                first = (message.splitlines() or [""])[0]
                if not first.strip() and record.exc_info and record.exc_info[1] is not None:
                    first = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}".splitlines()[0]
                record.msg, record.args = first[:300], None
                record.exc_info, record.exc_text, record.stack_info = None, None, None
        except Exception:  # noqa: BLE001 - a log filter must never make the logging call fail
            pass
        return True


_ONE_LINE = _OneLineRecords()


class _LevelPrefix(logging.Formatter):
    """``warning: message``, as the CLI's own notes and errors read. A library's error record (Orbax's background
    save thread on a full disk) is a ``note: <logger>:`` line: the failure reaches the CLI too, and its one
    ``error:`` line says what to do."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR and not record.name.startswith(("cancerllm_jax", "__main__")):
            return f"note: {record.name}: {text}"
        return f"{record.levelname.lower()}: {text}"


def _log_to_stderr_as_the_cli_speaks() -> None:
    """Log records as ``warning: ...`` lines on stderr. Without a handler, Python printed the bare message until a
    library (grain, on import) installed the default ``WARNING:name:message`` one: one command's warnings came out
    in both forms. Set before any library does; a handler already there (pytest's) is left alone."""
    if not logging.root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_LevelPrefix("%(message)s"))
        logging.root.addHandler(handler)


def cli_main(fn):
    """Wrap a CLI ``main``: a UserError, an OSError (disk full, permission) or XLA running out of memory prints one
    line and exits 2; any other exception prints one line saying it is a bug and exits 1. ``--debug`` (or
    CANCERLLM_DEBUG=1) keeps tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = "--debug" in sys.argv or os.environ.get("CANCERLLM_DEBUG") == "1"
        _log_to_stderr_as_the_cli_speaks()
        if not debug:
            logging.getLogger("absl").addFilter(_ONE_LINE)
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if debug:
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            if isinstance(e, PeerLost):
                sys.stdout.flush()
                os._exit(3)
            sys.exit(2)
        except OSError as e:
            if debug:
                raise
            print(f"error: {describe_os_error(e)}", file=sys.stderr)
            sys.exit(2)
        except Terminated as e:
            saved = (f"the run saved step {e.args[0]}, the last it finished" if e.args and e.args[0] is not None
                     else "no step had run in this start, so nothing new was saved")
            sigint = e.args[1:2] == ("SIGINT",)
            # the folder named: a command without --workdir would start a new run in a new folder
            folder = f" --workdir {shlex.quote(e.args[2])}" if len(e.args) > 2 and e.args[2] else ""
            print(f"{'interrupted (Ctrl-C)' if sigint else 'terminated (SIGTERM)'}: {saved}; run the same command "
                  f"with --resume{folder} to continue", file=sys.stderr)
            sys.exit(130 if sigint else 143)
        except ChildStopped as e:
            sigint = e.args[0] == "SIGINT"
            print(f"{'interrupted (Ctrl-C)' if sigint else 'terminated (SIGTERM)'}: {e.args[1]} was stopped too (a "
                  "training run saves the step it finished); run the same command again to continue",
                  file=sys.stderr)
            sys.exit(130 if sigint else 143)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            if fn.__module__ == "__main__":  # a script's own process: no interpreter shutdown, which dies of
                # SIGSEGV when the Ctrl-C came while XLA compiles on its threads; `finally` blocks have run by now
                sys.stdout.flush()
                os._exit(130)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - a bug, not the user's input: still one line without --debug
            if debug:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            if (os_error := os_error_in_text(e)) is not None:
                print(f"error: {describe_os_error(os_error)}", file=sys.stderr)
                sys.exit(2)
            if first.startswith("RESOURCE_EXHAUSTED") or "Out of memory allocating" in first:
                # XLA (the GPU's RESOURCE_EXHAUSTED; XLA:CPU's INTERNAL ... Out of memory allocating N bytes): the
                # batch, lengths or model do not fit the devices
                print(f"error: out of memory ({first.rstrip('.')}): lower the batch size or the sequence lengths, "
                      f"or spread the model over more devices (--mesh)", file=sys.stderr)
                sys.exit(2)
            print(f"error: unexpected {type(e).__name__}: {first} (this is a bug, not your input; run again with "
                  f"--debug for the traceback and report it)", file=sys.stderr)
            sys.exit(1)

    return wrapper


def refuse_unknown_arguments(name: str, given, function, hints: dict[str, str]) -> None:
    """A keyword in ``given`` that ``function`` does not name is a ``UserTypeError`` naming the nearest one (or the
    ``hints`` text for transformers habits such as ``torch_dtype``), not a bare TypeError. ``function``'s own
    ``**unknown`` collects these; any other ``**kwargs`` (a wrapped or patched decoder) takes anything."""
    params = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD and p.name != "unknown" for p in params.values()):
        return
    known = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key in given:
        if key not in known:
            raise UserTypeError(f"{name}() got an unexpected argument {key!r}{hints.get(key) or suggest(key, known)}; "
                                f"it takes {known}")
