"""Tokenizers: the Mistral v1 SentencePiece model (through sentencepiece) or any HF tokenizer folder.

Both expose the same small interface: ``encode(text, bos=..., eos=...) -> list[int]``, ``decode(ids) -> str``,
``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``, ``adds_bos`` (whether ``tokenizer(text)`` starts with the BOS:
``encode(text, bos=True)`` adds it only then, and training data is framed the same way) and ``adds_eos`` (whether
``tokenizer(text)`` ends with the EOS: prompts are never framed so, training data ends with it explicitly).
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np

from cancerllm_jax.errors import UserError, UserTypeError, refuse_unknown_arguments


def mistral_v1_model_file() -> str:
    """Path of the Mistral-7B v0.1 SentencePiece model shipped in the ``mistral-common`` wheel."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the Mistral v1 tokenizer needs the 'mistral-common' package: "
                        "pip install --no-deps mistral-common==1.13.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise UserError(f"{path} is missing from the installed mistral-common; reinstall mistral-common==1.13.1")
    return str(path)


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise UserTypeError(f"tokenizer.encode: text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # the tokenizers' own errors (a TypeError, a RuntimeError) would not say so
        raise UserError(f"tokenizer.encode: a lone UTF-16 surrogate ({text[e.start]!a}) at character {e.start}: "
                        "not text (decode the source with errors='replace', or fix it there)") from None
    return text


def _token_ids(ids) -> list[int]:
    """``ids`` (a list, a tuple or a 1-D integer array; one id) as a list of ints; anything else is a UserTypeError (a
    string, floats, booleans, a batch)."""
    arr = None
    if not isinstance(ids, (str, bytes)) and ids is not None:
        try:
            arr = np.asarray(ids)
        except ValueError:  # rows of different lengths
            pass
    if isinstance(ids, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in ids):
        what = "booleans"  # numpy would read [5, True] as the ids 5 and 1
    elif arr is None or arr.dtype.kind == "O":
        what = "values that are not int64 ids" if arr is not None and arr.ndim == 1 else type(ids).__name__
    elif arr.ndim > 1:
        what = f"a {arr.ndim}-D array"
    elif arr.dtype.kind in "iu" or arr.size == 0:
        return arr.reshape(-1).astype(np.int64).tolist()
    else:
        what = f"{arr.dtype} values"
    raise UserTypeError(f"tokenizer.decode: ids must be one sequence of integer token ids, got {what} (decode a "
                        "batch row by row)")


_ENCODE_HINTS = {"add_bos": " (use bos=True)", "add_special_tokens": " (use bos=True: the BOS where the tokenizer "
                 "frames text with one)", "add_eos": " (use eos=True)"}


class _CalledAsTransformers:
    """``tokenizer(text)`` as transformers' tokenizers answer it: ``{"input_ids", "attention_mask"}`` with the BOS
    where the tokenizer frames text with one and special-token strings read as those tokens (a list of texts: a
    list per text, unpadded), and the EOS where the tokenizer ends every text with one (``adds_eos``: an
    ``add_eos_token`` config; a prompt given to ``generate`` is framed without it). ``encode`` is the explicit form
    (no BOS unless ``bos=True``)."""

    def __call__(self, text, add_special_tokens: bool = True, **options) -> "Encoding":
        if options:
            from cancerllm_jax.errors import UserTypeError

            raise UserTypeError(f"tokenizer(text) takes add_special_tokens only, not {', '.join(sorted(options))}: "
                                "it gives unpadded lists; pad rows with tokenizer.pad_id (attention_mask 0 there), or "
                                "give lm.generate / lm.logits the texts or id lists as they are")
        if isinstance(text, (list, tuple)):
            rows = [self(t, add_special_tokens) for t in text]
            return Encoding({k: [r[k] for r in rows] for k in ("input_ids", "attention_mask")})
        ids = self.encode(text, bos=add_special_tokens, special=True)
        if add_special_tokens and self.adds_eos:  # a tokenizer that ends every text with its EOS
            ids.append(self.eos_id)
        return Encoding({"input_ids": ids, "attention_mask": [1] * len(ids)})


class Encoding(dict):
    """``tokenizer(text)``'s answer: a dict whose keys read as attributes too (``enc.input_ids``), as
    transformers' ``BatchEncoding``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class SentencePieceTokenizer(_CalledAsTransformers):
    """A SentencePiece ``.model`` file used directly (Mistral v1: vocab 32000, unk 0, bos 1, eos 2)."""

    def __init__(self, model_file: str):
        import sentencepiece as spm

        if not os.path.isfile(model_file):
            raise UserError(f"tokenizer file not found: {model_file}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_file)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError on a bad file
            raise UserError(f"{model_file}: not a SentencePiece model ({e})") from None
        self.name = model_file
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        # Mistral v1 has no pad piece: pad with unk (0), never with EOS, and mask it out.
        pad = int(self.sp.pad_id())
        self.pad_id = pad if pad >= 0 else int(self.sp.unk_id())
        self.vocab_size = int(self.sp.get_piece_size())
        self.adds_bos = self.bos_id >= 0  # as Llama / Mistral's HF tokenizers frame text
        self.adds_eos = False  # a folder whose config adds an EOS is read by transformers (HFTokenizer)
        # the control and unknown pieces (<unk>, <s>, </s>): HF's tokenizer(text) reads them as those tokens
        self.specials = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                         if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._special_re = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True)))
                                      + ")")

    def encode(self, text: str, bos: bool = False, eos: bool = False, special: bool = False, **unknown) -> list[int]:
        """As ``HFTokenizer.encode``: SentencePiece reads special-token strings (``</s>``) as text; with ``special``
        they are the tokens and the text between them is encoded piece by piece, as Llama's HF tokenizer does."""
        refuse_unknown_arguments("encode", unknown, SentencePieceTokenizer.encode, _ENCODE_HINTS)
        _check_text(text)
        head = [self.bos_id] if bos and self.adds_bos else []
        tail = [self.eos_id] if eos and self.eos_id >= 0 else []
        if not special or not self.specials:
            return head + list(self.sp.encode(text)) + tail
        body = [[self.specials[part]] if part in self.specials else self.sp.encode(part)
                for part in self._special_re.split(text) if part]
        return head + [i for ids in body for i in ids] + tail

    def decode(self, ids) -> str:
        """The text of ``ids`` without special tokens, as HF's ``decode(ids, skip_special_tokens=True)``: BOS, EOS,
        ``<unk>`` and ids past this vocabulary (a model may have more rows than its tokenizer has pieces) are
        dropped, never a crash."""
        n = self.vocab_size
        return self.sp.decode([i for i in _token_ids(ids) if 0 <= i < n and not self.sp.is_unknown(i)])


class HFTokenizer(_CalledAsTransformers):
    """Any tokenizer folder transformers can read (``tokenizer.json`` / ``tokenizer_config.json``), offline."""

    def __init__(self, folder: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            # transformers may route a folder by its config.json model_type to a tokenizer class with extra
            # dependencies (mistral → mistral-common's tekken, which needs tiktoken); a tokenizer.json alone is
            # read by the plain fast tokenizer
            self.tok = self._fast(folder)
            if self.tok is None:
                raise UserError(f"{folder}: could not load a tokenizer ({type(e).__name__}: {e})") from None
        self.name = folder
        t = self.tok
        self.bos_id = t.bos_token_id if t.bos_token_id is not None else -1
        self.eos_id = t.eos_token_id if t.eos_token_id is not None else -1
        pad = t.pad_token_id
        if pad is None or pad == self.eos_id:  # never pad with EOS (padding is masked, but EOS is a trained target)
            pad = next(c for c in (t.unk_token_id, 0, 1, 2) if c is not None and c not in (self.eos_id, self.bos_id))
        self.pad_id = int(pad)
        self.vocab_size = len(t)
        # does ``tokenizer(text)`` start with BOS? (Llama / Mistral: yes; GPT-2-style byte BPE such as SmolLM2's: no)
        plain, framed = t.encode("a", add_special_tokens=False), t.encode("a", add_special_tokens=True)
        self.adds_bos = self.bos_id >= 0 and framed[:len(plain) + 1] == [self.bos_id] + plain
        # does it end every text with the EOS (a config's add_eos_token)? only tokenizer(text) adds it then
        self.adds_eos = self.eos_id >= 0 and framed[-len(plain) - 1:] == plain + [self.eos_id]

    @staticmethod
    def _fast(folder: str):
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return None
        from transformers import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
        except Exception:
            return None

    def encode(self, text: str, bos: bool = False, eos: bool = False, special: bool = False, **unknown) -> list[int]:
        """The text's ids; ``bos``: after the BOS when this tokenizer frames text with one (``adds_bos``), as
        ``tokenizer(text)`` does; ``eos``: then the EOS. Special-token strings in the text (``<|im_end|>``, ``</s>``)
        are encoded as plain text, as SentencePiece does, never as the special tokens themselves (notes and
        examples are data), unless ``special``: then they are the special tokens, as ``tokenizer(text)`` reads
        them (a prompt someone wrote with a chat template)."""
        refuse_unknown_arguments("encode", unknown, HFTokenizer.encode, _ENCODE_HINTS)
        ids = list(self.tok.encode(_check_text(text), add_special_tokens=False, split_special_tokens=not special))
        if bos and self.adds_bos:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids) -> str:
        """As ``SentencePieceTokenizer.decode``: special tokens and ids past this vocabulary are dropped."""
        n = len(self.tok)
        return self.tok.decode([i for i in _token_ids(ids) if 0 <= i < n], skip_special_tokens=True)


def bos_ids(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer starts text with one, as ``tokenizer(text)`` does (Mistral, Llama), else ``[]``
    (GPT-2-style tokenizers such as SmolLM2's, and tokenizers without a BOS token)."""
    return [tokenizer.bos_id] if getattr(tokenizer, "adds_bos", tokenizer.bos_id >= 0) else []


def training_eos_id(tokenizer) -> int:
    """The EOS id that ends documents and responses in training data; a tokenizer without one is an error."""
    if tokenizer.eos_id < 0:
        raise UserError(f"{getattr(tokenizer, 'name', 'the tokenizer')}: the tokenizer has no EOS token, which "
                        "training needs to end each document and response; set eos_token in its "
                        "tokenizer_config.json")
    return tokenizer.eos_id


def encode_written_prompt(tokenizer, text: str, bos: bool) -> list[int]:
    """A prompt's ids as ``tokenizer(text)`` gives them: special-token strings in it (a chat template's
    ``<|im_start|>``) are the special tokens where the tokenizer reads them so (``encode(..., special=True)``; a
    tokenizer object without that option encodes them its own way)."""
    import inspect

    if "special" in inspect.signature(tokenizer.encode).parameters:
        return tokenizer.encode(text, bos=bos, special=True)
    return tokenizer.encode(text, bos=bos)


def tokenizer_path(spec) -> str:
    """A tokenizer argument (a str or ``os.PathLike``) as a path string, ``~`` expanded; anything else is an error."""
    if not isinstance(spec, (str, os.PathLike)):
        raise UserError(f"tokenizer: expected 'mistral-v1', a .model file or an HF tokenizer folder, got {spec!r}")
    return os.path.expanduser(os.fspath(spec))


def _config_changes_the_model(folder: str, sp: SentencePieceTokenizer) -> bool:
    """Whether the folder's tokenizer_config.json / special_tokens_map.json / added_tokens.json ask for more than the
    SentencePiece model itself does: added tokens past its vocabulary, another BOS or EOS, no BOS or an EOS added to
    every text (then transformers reads the folder, as it would)."""
    def read(name: str) -> dict:  # absent: {}; present but not a JSON object: one error naming the file (and line)
        from cancerllm_jax.data.sources import json_type_name, load_json_file

        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return {}
        data = load_json_file(path, unique_keys=False)  # as transformers reads it
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object, got {json_type_name(data)}")
        return data

    config, special, added = read("tokenizer_config.json"), read("special_tokens_map.json"), read("added_tokens.json")
    ids = [*(config.get("added_tokens_decoder") or {}), *added.values()]
    if any(str(i).isdigit() and int(i) >= sp.vocab_size for i in ids):
        return True
    if config.get("add_bos_token") is False or config.get("add_eos_token") is True:
        return True
    pieces = {"bos_token": sp.sp.id_to_piece(sp.bos_id) if sp.bos_id >= 0 else None,
              "eos_token": sp.sp.id_to_piece(sp.eos_id) if sp.eos_id >= 0 else None}
    for source in (config, special):
        for key, piece in pieces.items():
            token = source.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None and token != piece:
                return True
    return False


def load_tokenizer(spec: str | None):
    """``None``/``"mistral-v1"`` → the shipped Mistral v1 model; a SentencePiece model file (``x.model``,
    ``tokenizer.model.v1``, ``x.spm``); or an HF tokenizer folder (or its ``tokenizer.json``)."""
    if spec in (None, "", "mistral-v1", "mistral"):
        return SentencePieceTokenizer(mistral_v1_model_file())
    spec = tokenizer_path(spec)
    if os.path.isfile(spec) and os.path.basename(spec) in ("tokenizer.json", "tokenizer_config.json"):
        spec = os.path.dirname(os.path.abspath(spec))  # the folder that holds it
    elif os.path.isfile(spec) and (".model" in os.path.basename(spec) or spec.endswith(".spm")):
        return SentencePieceTokenizer(spec)  # a SentencePiece model: x.model, mistral-common's tokenizer.model.v1
    if os.path.isdir(spec):
        model_file = os.path.join(spec, "tokenizer.model")
        if os.path.isfile(os.path.join(spec, "tokenizer.json")):
            return HFTokenizer(spec)
        if os.path.isfile(model_file):  # (a slow tokenizer's save): the .model itself, as it was trained; transformers
            sp = SentencePieceTokenizer(model_file)  # 5 would convert it, and its ids differ around spaces
            if not _config_changes_the_model(spec, sp):
                return sp
        if os.path.isfile(os.path.join(spec, "tokenizer_config.json")):
            return HFTokenizer(spec)
        raise UserError(f"{spec}: no tokenizer.json, tokenizer_config.json or tokenizer.model in this folder")
    what = "is not a tokenizer" if os.path.exists(spec) else "not found"
    raise UserError(f"tokenizer {what}: {spec} (give 'mistral-v1', a .model file or an HF tokenizer folder)")
