"""Assertions shared by the test files."""


def one_clear_error(code, err, *needles) -> str:
    """A CLI failure: non-zero exit, no traceback, exactly one `error: ` line naming every needle."""
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
