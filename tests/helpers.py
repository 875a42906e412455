"""Assertions and runners shared by the test files."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODULES: dict[str, object] = {}


def one_clear_error(code, err, *needles) -> str:
    """A CLI failure: non-zero exit, no traceback, exactly one `error: ` line naming every needle."""
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def cli_module(rel: str):
    """The script ``rel`` (``launch/pretrain.py``) imported once per process, its folder on the path."""
    if rel not in _MODULES:
        folder = os.path.join(ROOT, os.path.dirname(rel))
        if folder not in sys.path:
            sys.path.insert(0, folder)
        spec = importlib.util.spec_from_file_location("cli_" + rel.replace("/", "_")[:-3], os.path.join(ROOT, rel))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses defined in the script look their module up
        spec.loader.exec_module(mod)
        _MODULES[rel] = mod
    return _MODULES[rel]


def run_cli(rel: str, argv: list, capsys) -> tuple[int, str]:
    """``(exit code, stderr)`` of the script ``rel``'s ``main(argv)`` run in this process."""
    capsys.readouterr()
    try:
        code = cli_module(rel).main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err
