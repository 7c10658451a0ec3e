"""Numba's disk cache is keyed on all of minisparse's compiled source (minisparse/numba_cache.py):
a kernel that calls njit functions of another file must not keep running their old code from its
cache after that file changes."""
import shutil

from minisparse import numba_cache
from minisparse.fast import q8, step
from minisparse.attention import kernel


def test_package_kernels_use_the_package_stamp():
    # dispatchers of several files, including one that compiles in other files' functions
    for disp in (q8.matvec, step._layer, kernel._fold):
        locator = disp._cache._impl.locator
        assert isinstance(locator, numba_cache._PackageStamp), (disp, type(locator))
        assert locator.get_source_stamp() == numba_cache.package_stamp()
        assert numba_cache.package_stamp() in locator.get_disambiguator()


def test_stamp_changes_with_any_kernel_file_and_only_those(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(numba_cache.ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    before = numba_cache.stamp_of(root)
    assert before == numba_cache.package_stamp()          # the same files give the same stamp
    # a file without compiled code: the kernels' caches stay valid
    (root / "errors.py").write_text((root / "errors.py").read_text() + "\n# a comment\n")
    assert numba_cache.stamp_of(root) == before
    # a callee's file (q8.py is compiled into fast/step.py's layer): every stamp changes
    q8_file = root / "fast" / "q8.py"
    q8_file.write_text(q8_file.read_text() + "\n# a comment\n")
    assert numba_cache.stamp_of(root) != before


def test_functions_outside_the_package_keep_numbas_locator(tmp_path):
    assert numba_cache._in_package(numba_cache.ROOT / "fast" / "q8.py")
    assert not numba_cache._in_package(tmp_path / "mine.py")
    assert not numba_cache._in_package(numba_cache.ROOT.parent / "tests" / "test_numba_cache.py")
