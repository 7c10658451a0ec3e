"""The command line: text on stdout, one-line errors with exit code 2 and no traceback."""
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from minisparse.cli import main

from conftest import shared_fixture


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "minisparse", *args], capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_generate_prints_the_prompt_and_a_continuation(stories_path):
    rc, out, err = run_cli("generate", "-m", str(stories_path), "-p", "Once upon a time", "-n", "20",
                           "--temp", "0")
    assert rc == 0, err
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time") + 20
    assert "tok/s" in err and "Traceback" not in err


def test_greedy_generate_is_the_golden_text(stories_path):
    golden = shared_fixture("stories260K.greedy200.txt").read_text(encoding="utf-8")
    rc, out, err = run_cli("generate", "-m", str(stories_path), "-p", "", "-n", "200", "--temp", "0")
    assert rc == 0, err
    assert out == golden + "\n"


def test_info_describes_the_model(stories_path):
    rc, out, err = run_cli("info", str(stories_path), "--check")
    assert rc == 0, err
    assert "n_layers" in out and "512 tokens" in out and "all tensors finite" in out


def _one_line_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("minisparse: error: ") and err.count("\n") == 1, err
    return err


def test_missing_model_file_is_one_line(capsys, tmp_path):
    err = _one_line_error(capsys, ["generate", "-m", str(tmp_path / "absent.gguf"), "-p", "x"])
    assert "absent.gguf" in err


def test_prompt_longer_than_context_is_one_line(capsys, stories_path):
    err = _one_line_error(capsys, ["generate", "-m", str(stories_path), "-p", "Once upon a time " * 40,
                                   "-c", "32"])
    assert "context" in err and "-c" in err


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--top-k", "many"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--top-k" in err


def test_unknown_attention_spec_is_one_line(capsys, stories_path):
    err = _one_line_error(capsys, ["generate", "-m", str(stories_path), "-p", "x", "--attention",
                                   "wibble=3"])
    assert "wibble" in err


bad_values = st.one_of(
    st.tuples(st.just("--temp"), st.floats(max_value=-1e-6, allow_nan=False) | st.just(float("nan"))),
    st.tuples(st.just("--top-p"), st.floats(min_value=1.0001, max_value=1e6) | st.floats(max_value=0.0)),
    st.tuples(st.just("--min-p"), st.floats(min_value=1.0001, max_value=1e6) | st.floats(max_value=-1e-6)),
    st.tuples(st.just("--top-k"), st.integers(max_value=-1)),
    st.tuples(st.just("--repeat-penalty"), st.floats(max_value=0.0)),
    st.tuples(st.just("--seed"), st.integers(max_value=-1)),
)


@given(bad_values)
def test_invalid_sampling_values_are_refused_before_loading(flag_value):
    # The model path does not exist: if the values were not checked first, the error would name
    # the file instead of the bad value.
    flag, value = flag_value
    import io
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = main(["generate", "-m", "/nonexistent/model.gguf", "-p", "x", f"{flag}={value!r}"])
    err = buf.getvalue()
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert flag.lstrip("-").replace("-", "_").replace("temp", "temperature") in err, err


def test_threads_option_sets_numba_threads_and_refuses_too_many(capsys, stories_path):
    import numba
    from threadpoolctl import threadpool_limits
    before = numba.get_num_threads()
    try:
        with threadpool_limits(limits=None):       # --threads limits BLAS too: restored on exit
            assert main(["--threads", "1", "generate", "-m", str(stories_path), "-p", "Once", "-n",
                         "3", "--temp", "0"]) == 0
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)
    capsys.readouterr()
    too_many = numba.config.NUMBA_NUM_THREADS + 1
    assert main(["--threads", str(too_many), "info", str(stories_path)]) == 2
    err = capsys.readouterr().err
    assert f"--threads {too_many}: at most" in err and "Traceback" not in err
