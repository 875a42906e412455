"""Reading JSONL and text sources: every bad input is a UserError naming the file and line."""
from __future__ import annotations

import json

import pytest

from cancerllm_jax.data.sources import read_documents, read_jsonl, read_text_documents
from cancerllm_jax.errors import UserError

REQ = {"instruction": str, "response": str}


def write(tmp_path, name: str, content: str | bytes):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


def good(i: int = 0) -> str:
    return json.dumps({"instruction": f"q{i}", "response": f"a{i}"})


def test_reads_records_and_ignores_blank_lines(tmp_path):
    path = write(tmp_path, "ok.jsonl", good(0) + "\n\n   \n" + good(1) + "\n")
    records, skipped = read_jsonl(path, REQ)
    assert [r["response"] for r in records] == ["a0", "a1"] and skipped == 0


def test_line_numbers_are_kept_on_request(tmp_path):
    path = write(tmp_path, "ok.jsonl", "\n" + good(0) + "\n")
    records, _ = read_jsonl(path, REQ, line_key="_line")
    assert records[0]["_line"] == 2


@pytest.mark.parametrize("bad_line, expect", [
    ('{"instruction": "q", "response": ', "invalid JSON"),
    ('{"instruction": "q"}', "missing field 'response'"),
    ('{"instruction": "q", "response": 3}', "field 'response' should be a string, got integer"),
    ('{"instruction": "q", "response": null}', "got null"),
    ('["not", "an", "object"]', "expected a JSON object, got array"),
])
def test_bad_line_names_file_and_line(tmp_path, bad_line, expect):
    path = write(tmp_path, "bad.jsonl", good(0) + "\n" + good(1) + "\n" + bad_line + "\n")
    with pytest.raises(UserError) as e:
        read_jsonl(path, REQ)
    assert f"{path}:3:" in str(e.value) and expect in str(e.value)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = write(tmp_path, "latin1.jsonl", good(0).encode() + b"\n" + '{"instruction": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        read_jsonl(path, REQ)


def test_empty_file_is_an_error(tmp_path):
    path = write(tmp_path, "empty.jsonl", "\n  \n")
    with pytest.raises(UserError, match="no records"):
        read_jsonl(path, REQ)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_jsonl(str(tmp_path / "nope.jsonl"), REQ)
    (tmp_path / "a_folder").mkdir()  # a folder where a file is wanted said "no such file" although it exists
    with pytest.raises(UserError, match="a_folder: is a folder; give a file"):
        read_jsonl(str(tmp_path / "a_folder"), REQ)
    with pytest.raises(UserError, match="a_folder: is a folder; give a file"):
        read_text_documents(str(tmp_path / "a_folder"))


def test_a_key_given_twice_in_one_line_is_an_error(tmp_path):
    """``{"context": "note A", "context": "note B"}`` was read as note B, silently (as the YAML reader refuses it)."""
    from cancerllm_jax.eval.protocol import score_file

    path = write(tmp_path, "dup.jsonl", '{"instruction": "q", "response": "a"}\n'
                                        '{"instruction": "q", "context": "A", "context": "B", "response": "a"}\n')
    with pytest.raises(UserError, match=r"dup\.jsonl:2: key 'context' given twice"):
        read_jsonl(path, REQ)
    records, skipped = read_jsonl(path, REQ, skip_bad_lines=True)
    assert len(records) == 1 and skipped == 1
    pred = write(tmp_path, "p.jsonl", '{"prediction": "a", "prediction": "b"}\n{"prediction": "a"}\n')
    with pytest.raises(UserError, match=r"p\.jsonl:1: key 'prediction' given twice"):
        score_file(path, pred)


def test_missing_field_suggests_a_near_name(tmp_path):
    path = write(tmp_path, "typo.jsonl", '{"instruction": "q", "responce": "a"}\n')
    with pytest.raises(UserError, match="did you mean 'responce'"):
        read_jsonl(path, REQ)


def test_skip_bad_lines_counts(tmp_path):
    lines = [good(0), "{oops", '{"instruction": "q"}', good(1), "[1]"]
    path = write(tmp_path, "mixed.jsonl", "\n".join(lines).encode() + b"\n\xff\xfe\n")
    records, skipped = read_jsonl(path, REQ, skip_bad_lines=True)
    assert len(records) == 2 and skipped == 4


def test_all_bad_lines_still_an_error(tmp_path):
    path = write(tmp_path, "allbad.jsonl", "{oops\n[1]\n")
    with pytest.raises(UserError, match=r"no records; 2 bad line\(s\) skipped"):
        read_jsonl(path, REQ, skip_bad_lines=True)


def test_optional_fields_are_type_checked(tmp_path):
    path = write(tmp_path, "opt.jsonl", good(0) + "\n" + '{"instruction": "q", "response": "a", "context": 5}\n')
    with pytest.raises(UserError, match=r"opt\.jsonl:2: field 'context'"):
        read_jsonl(path, REQ, optional={"context": str})
    path = write(tmp_path, "opt2.jsonl", '{"instruction": "q", "response": "a", "context": null}\n')
    assert "context" not in read_jsonl(path, REQ, optional={"context": str})[0][0]  # null = absent


def test_text_documents_one_per_file_or_per_paragraph(tmp_path):
    note = "Reason for visit: follow-up.\n\nAssessment: stable disease.\n"
    path = write(tmp_path, "note.txt", note)
    assert read_text_documents(path) == [{"text": note.strip(), "source": path}]
    assert [d["text"] for d in read_text_documents(path, split_on_blank_lines=True)] == [
        "Reason for visit: follow-up.", "Assessment: stable disease."]


def test_text_document_errors(tmp_path):
    with pytest.raises(UserError, match="no records"):
        read_text_documents(write(tmp_path, "empty.txt", " \n\n"))
    with pytest.raises(UserError, match=r"bad\.txt:3: not valid UTF-8"):
        read_text_documents(write(tmp_path, "bad.txt", b"one\ntwo\nthr\xe9e\n"))


def test_read_documents_dispatches_on_extension(tmp_path):
    write(tmp_path, "a.jsonl", json.dumps({"text": "first note"}) + "\n{bad\n" + json.dumps({"text": "second"}) + "\n")
    write(tmp_path, "b.txt", "a pathology report\n")
    docs, skipped = read_documents(str(tmp_path / "*"), skip_bad_lines=True)
    assert [d["text"] for d in docs] == ["first note", "second", "a pathology report"] and skipped == 1
    assert docs[0]["source"].endswith("a.jsonl") and docs[2]["source"].endswith("b.txt")
    docs_dir, _ = read_documents(str(tmp_path), skip_bad_lines=True)
    assert docs_dir == docs
    with pytest.raises(UserError, match=r"a\.jsonl:2: invalid JSON"):
        read_documents(str(tmp_path / "a.jsonl"))


def test_with_skip_bad_lines_a_bad_or_empty_file_of_several_is_counted_and_skipped(tmp_path, caplog):
    """A Latin-1 .txt or an export with no valid line in a folder stopped the run even with --skip-bad-lines."""
    write(tmp_path, "a.jsonl", json.dumps({"text": "first note"}) + "\n")
    write(tmp_path, "b.txt", b"caf\xe9 note\n")  # Latin-1: one bad file, counted as one bad line
    write(tmp_path, "c.jsonl", "{bad\n{worse\n")  # nothing but bad lines: both counted
    write(tmp_path, "d.jsonl", "")
    with caplog.at_level("WARNING"):
        docs, skipped = read_documents(str(tmp_path), skip_bad_lines=True)
    assert [d["text"] for d in docs] == ["first note"] and skipped == 3
    assert "b.txt:1: not valid UTF-8" in caplog.text and "c.jsonl: no records" in caplog.text
    with pytest.raises(UserError, match=r"b\.txt:1: not valid UTF-8.*--skip-bad-lines"):
        read_documents(str(tmp_path))
    with pytest.raises(UserError, match="no documents"):
        read_documents(str(tmp_path / "[bcd].*"), skip_bad_lines=True)


def test_error_columns_read_as_an_editor_shows_them(tmp_path):
    with pytest.raises(UserError, match=r"col\.jsonl:1: not valid UTF-8 \(byte 0xff at column 13\)"):
        read_jsonl(write(tmp_path, "col.jsonl", '{"text": "éé'.encode() + b"\xff" + b'"}\n'), REQ)
    with pytest.raises(UserError, match=r"invalid JSON \(Unterminated string starting at column 10\)"):
        read_jsonl(write(tmp_path, "open.jsonl", '{"text": "never closed\n'), REQ)


def test_a_directory_reads_any_case_and_names_what_it_ignores(tmp_path, caplog):
    write(tmp_path, "a.jsonl", json.dumps({"text": "first"}) + "\n")
    write(tmp_path, "B.JSONL", json.dumps({"text": "second"}) + "\n")
    write(tmp_path, "c.TXT", "third\n")
    write(tmp_path, "notes.json", "{}")
    write(tmp_path, ".hidden", "x")
    (tmp_path / "lung" / "2024").mkdir(parents=True)  # a subfolder is named, not read (it may be a run or a split)
    write(tmp_path / "lung" / "2024", "d.txt", "fourth\n")
    (tmp_path / ".cache").mkdir()
    docs, _ = read_documents(str(tmp_path))
    assert sorted(d["text"] for d in docs) == ["first", "second", "third"]
    assert "ignored 1 file(s)" in caplog.text and "notes.json" in caplog.text and ".hidden" not in caplog.text
    assert "subfolder(s) not read: lung (" in caplog.text and ".cache" not in caplog.text
    docs, _ = read_documents(str(tmp_path / "**" / "*.txt"))  # a glob reaches into them (c.TXT: globs keep case)
    assert [d["text"] for d in docs] == ["fourth"]


def test_a_file_named_like_a_glob_is_read_as_that_file(tmp_path):
    write(tmp_path, "notes[1].jsonl", json.dumps({"text": "first"}) + "\n")
    write(tmp_path, "notes1.jsonl", json.dumps({"text": "other"}) + "\n")
    docs, _ = read_documents(str(tmp_path / "notes[1].jsonl"))
    assert [d["text"] for d in docs] == ["first"]
    docs, _ = read_documents(str(tmp_path / "notes[0-9].jsonl"))  # still a glob when no such file exists
    assert [d["text"] for d in docs] == ["other"]


def test_read_documents_errors(tmp_path):
    with pytest.raises(UserError, match="matches no"):
        read_documents(str(tmp_path / "*.jsonl"))
    with pytest.raises(UserError, match="unsupported file type"):
        read_documents(write(tmp_path, "notes.csv", "a,b\n"))


def test_empty_document_text_is_a_bad_line(tmp_path):
    """A JSONL document of only whitespace is refused naming file, line and field (or counted with skip)."""
    path = write(tmp_path, "notes.jsonl", json.dumps({"text": "a note"}) + "\n" + json.dumps({"text": " \n"}) + "\n")
    with pytest.raises(UserError, match=r"notes\.jsonl:2: field 'text' is empty"):
        read_documents(path)
    docs, skipped = read_documents(path, skip_bad_lines=True)
    assert [d["text"] for d in docs] == ["a note"] and skipped == 1
    assert read_jsonl(path, {"text": str})[0][1]["text"] == " \n"  # only where asked


def test_edge_case_lines(tmp_path):
    """BOM + CRLF, trailing whitespace, unicode (emoji, CJK, NUL escape) are read as written; a BOM in the middle
    of a file (concatenated files) names its line."""
    text = "emoji \U0001f642 中文 \u2028 a\u0000b"
    path = write(tmp_path, "crlf.jsonl", b"\xef\xbb\xbf" + json.dumps({"text": text}, ensure_ascii=False).encode()
                 + b"  \t\r\n\r\n" + json.dumps({"text": "x"}).encode() + b"\r\n")
    assert [d["text"] for d in read_documents(path)[0]] == [text, "x"]
    path = write(tmp_path, "cat.jsonl", json.dumps({"text": "a"}) + "\n\ufeff" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(UserError, match=r"cat\.jsonl:2: invalid JSON"):
        read_documents(path)


@pytest.mark.parametrize("line, expect", [("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                          ('{"text": "a", "n": ' + "1" * 5000 + "}", "4300 digits")])
def test_hostile_json_is_a_bad_line_not_a_crash(tmp_path, line, expect):
    path = write(tmp_path, "hostile.jsonl", json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=rf"hostile\.jsonl:2: invalid JSON \(.*{expect}"):
        read_jsonl(path, {"text": str})
    assert read_jsonl(path, {"text": str}, skip_bad_lines=True)[1] == 1


def test_a_source_path_may_start_with_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, "notes.jsonl", json.dumps({"text": "first"}) + "\n")
    docs, _ = read_documents("~/notes.jsonl")
    assert [d["text"] for d in docs] == ["first"]


def test_the_lone_cr_hint_is_given_only_for_lone_cr_line_ends(tmp_path):
    from cancerllm_jax.data.sources import read_jsonl

    (tmp_path / "cr.jsonl").write_bytes(b'{"text": "a"}\r{"text": "b"}\r')
    with pytest.raises(UserError, match="cr.jsonl:1: .*lone CR"):
        read_jsonl(str(tmp_path / "cr.jsonl"), {"text": str})
    (tmp_path / "lf.jsonl").write_bytes(b'{"text": "a\rb"}\n')  # a raw CR inside a value: no advice on line ends
    with pytest.raises(UserError, match="lf.jsonl:1: invalid JSON") as e:
        read_jsonl(str(tmp_path / "lf.jsonl"), {"text": str})
    assert "lone CR" not in str(e.value)


def test_a_json_document_or_a_gzip_file_given_as_jsonl_is_named_so(tmp_path):
    import gzip

    from cancerllm_jax.data.sources import read_jsonl

    (tmp_path / "doc.jsonl").write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    with pytest.raises(UserError, match="doc.jsonl:1: invalid JSON .*one JSON document over many lines"):
        read_jsonl(str(tmp_path / "doc.jsonl"), {"text": str})
    (tmp_path / "z.jsonl").write_bytes(gzip.compress(b'{"text": "a"}\n'))
    with pytest.raises(UserError, match="z.jsonl:1: not valid UTF-8 .*gzip-compressed"):
        read_jsonl(str(tmp_path / "z.jsonl"), {"text": str})
    (tmp_path / "ok.jsonl").write_text('{"text": "a"}\n[\n')  # a later line of "[": no such advice
    with pytest.raises(UserError, match="ok.jsonl:2: invalid JSON") as e:
        read_jsonl(str(tmp_path / "ok.jsonl"), {"text": str})
    assert "one JSON document" not in str(e.value)


def test_the_float16_range_check_reads_a_host_array_in_slices():
    import numpy as np

    from cancerllm_jax.model import check_fits

    big = np.zeros((5 << 20,), np.float32)  # more than one 4M-value slice
    big[0] = np.inf  # already infinite: float16 keeps it so, nothing is lost
    check_fits("w", big, np.float16)
    big[-1] = -7e4
    with pytest.raises(UserError, match="w: values up to 7e.04 do not fit float16"):
        check_fits("w", big, np.float16)
    import jax.numpy as jnp

    with pytest.raises(UserError, match=r"values up to 7\.0\d*e\+04"):  # 7e4 in bfloat16: 70144
        check_fits("w", jnp.asarray(big, jnp.bfloat16), jnp.float16)
    check_fits("w", big, np.float32)  # other dtypes hold it
