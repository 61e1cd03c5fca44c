"""Writing outputs without ever destroying a user's data: atomic files and directories, the rules
for what an output may be and what `--force` may replace, and hashing.

The rules (`check_output`), applied by every verb before any work and again at the moment of the
swap:
- an output may not equal, contain, or lie inside any of the command's inputs;
- an existing output is replaced only when asked (`force`), and only if llmc wrote it: a directory
  carrying llmc's marker (`.llmc-output.json`, or an engine's `engine.json`) and no file the marker
  does not list, or a regular file whose first bytes carry llmc's producer stamp;
- never a symlink, a device, a FIFO or a socket.

Temporary work for an output `DIR/OUT` lives in `DIR/.OUT.llmc-tmp.PID` (same filesystem, so the
final step is a rename). A replaced directory is swapped in one `renameat2(RENAME_EXCHANGE)`, so
either the old or the new output is at the path at every instant; where the platform lacks it
(not Linux, or a filesystem without it) the fallback is two renames through
`DIR/.OUT.llmc-old.PID`, and a crash between them leaves the old output there. Every run first
removes the leftovers of dead processes (by pid) for its output, and puts a stranded old output
back where it belongs; a live process's files are never touched.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from llmc.errors import ConfigError

MARKER = ".llmc-output.json"
PRODUCER = "llmc"                       # the stamp files and markers carry: "llmc <version>"
MAX_SAFETENSORS_HEADER = 100 << 20
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.llmc-(?P<kind>tmp|old|work)\.(?P<pid>\d+)$")


class OutputError(ConfigError):
    """An output path that llmc refuses to write or replace."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def producer_stamp() -> str:
    from llmc import __version__
    return f"{PRODUCER} {__version__}"


# ---------------------------------------------------------------------------------------------
# What an output may be

def _kind(st: os.stat_result) -> str:
    m = st.st_mode
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file")):
        if test(m):
            return name
    return "a special file"


def _overlap(out: Path, inputs: Iterable[Path | str | None]) -> str | None:
    """Why `out` may not be written given the inputs, or None."""
    o = Path(os.path.abspath(out)).resolve()
    for i in inputs:
        if i is None:
            continue
        p = Path(os.path.abspath(i)).resolve()
        if o == p:
            return f"it is the input {i}"
        if o in p.parents:
            return f"it contains the input {i}"
        if p in o.parents:
            return f"it lies inside the input {i}"
    return None


def _walk(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() or p.is_symlink())


def _listed_files(d: Path) -> set[str] | None:
    """The files llmc says it wrote into directory `d` (its marker, or an engine manifest), or None."""
    for name, key in ((MARKER, "files"), ("engine.json", "files")):
        f = d / name
        try:
            if not f.is_file() or f.is_symlink() or f.stat().st_size > 64 << 20:
                continue
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(data, dict):
            continue
        producer = data.get("producer") if name == MARKER else f"{PRODUCER} {data.get('llmc_version')}"
        files = data.get(key)
        if isinstance(producer, str) and producer.startswith(PRODUCER + " ") and isinstance(files, (list, dict)):
            return {str(x) for x in files} | {name}
    return None


XML_STAMP = "<!-- written by "         # the first line after the XML declaration of an XML file llmc wrote


def written_by_llmc_file(p: Path) -> bool:
    """A regular file llmc wrote: a JSON file that starts with llmc's producer stamp (see
    `stamp_json`), an XML file with llmc's stamp comment (`xml_stamp`), or a safetensors file whose
    metadata names llmc as its producer."""
    try:
        with open(p, "rb") as f:
            head = f.read(256)
            if re.match(rb'\{\s*"producer":\s*"llmc ', head) or \
                    re.match(rb'<\?xml[^>]*\?>\s*' + re.escape(f"{XML_STAMP}{PRODUCER} ".encode()), head):
                return True
            if len(head) < 8:
                return False
            size = int.from_bytes(head[:8], "little")          # safetensors: a JSON header of this many bytes
            if not 2 <= size <= MAX_SAFETENSORS_HEADER:
                return False
            f.seek(8)
            meta = json.loads(f.read(size)).get("__metadata__") or {}
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(meta, dict) and str(meta.get("producer", "")).startswith(PRODUCER + " ")


def xml_stamp() -> str:
    """The comment that marks an XML file as llmc's (written_by_llmc_file)."""
    return f"{XML_STAMP}{producer_stamp()} -->"


def check_output(out: Path | str, inputs: Iterable[Path | str | None] = (), *, force: bool = False,
                 directory: bool = True, what: str = "output", flag: str = "--force") -> Path:
    """Refuse an output that would destroy data (module docstring); returns the path. Nothing is
    touched: call it before any work, and again before replacing."""
    out = Path(out)
    why = _overlap(out, inputs)
    if why is not None:
        raise OutputError(f"{out}: refusing to write the {what} there: {why}",
                          hint="choose an output path outside every input")
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return out
    except OSError as e:
        raise OutputError(f"{out}: cannot check the {what} path ({e.strerror or e})") from None
    kind = _kind(st)
    if kind not in ("a directory", "a regular file"):
        raise OutputError(f"{out}: is {kind}; llmc never replaces one", hint="choose another output path")
    if directory and kind != "a directory":
        raise OutputError(f"{out}: is {kind}, not an output directory llmc wrote; llmc will not replace it",
                          hint="choose another output path")
    if not directory and kind != "a regular file":
        raise OutputError(f"{out}: is {kind}; the {what} must be a file", hint="choose another output path")
    if not force:
        raise OutputError(f"{out} already exists", hint=f"pass {flag} to replace it" if flag else
                          "remove it or choose another path")
    if directory:
        listed = _listed_files(out)
        if listed is None:
            raise OutputError(f"{out}: exists and was not written by llmc (no {MARKER} or engine.json); "
                              f"{flag} replaces only llmc's own outputs", hint="remove it yourself, or choose "
                              "another output path")
        foreign = [f for f in _walk(out) if f not in listed]
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputError(f"{out}: holds files llmc did not write ({foreign[0]}{more}); {flag} will not "
                              f"replace it", hint="move those files away, or choose another output path")
    elif not written_by_llmc_file(out):
        raise OutputError(f"{out}: exists and was not written by llmc; it will not be replaced",
                          hint="remove it yourself, or choose another path")
    return out


# ---------------------------------------------------------------------------------------------
# Leftovers of earlier runs

def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # someone else's live process
        return True
    return True


def clean_leftovers(final: Path) -> list[Path]:
    """Remove `.FINAL.llmc-tmp.PID` / `.FINAL.llmc-old.PID` of dead processes that we own; an old
    output stranded by a crash between the fallback's two renames goes back to `final` if nothing
    is there. Returns what was removed or restored."""
    final = Path(final)
    done = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return done
    for e in entries:
        m = _LEFTOVER.match(e.name)
        if m is None or m["name"] != final.name or _alive(int(m["pid"])):
            continue
        try:
            if e.stat(follow_symlinks=False).st_uid != os.geteuid():
                continue
        except OSError:
            continue
        p = Path(e.path)
        if m["kind"] == "old" and not os.path.lexists(final):
            os.rename(p, final)
        elif e.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p)
    return done


def temp_path(final: Path, kind: str = "tmp") -> Path:
    """Where this process keeps temporary work for `final`: `.FINAL.llmc-KIND.PID` beside it
    (kind tmp: the output being written; work: intermediate results; old: the replaced output)."""
    return final.with_name(f".{final.name}.llmc-{kind}.{os.getpid()}")


# ---------------------------------------------------------------------------------------------
# Writing

def stamp_json(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with llmc's producer stamp first, so a later run knows llmc wrote the file."""
    return {"producer": producer_stamp(), **{k: v for k, v in obj.items() if k != "producer"}}


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file by temp file + rename (the caller has checked the path with `check_output`)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(path)
        with removed_on_failure(tmp):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the umask applies, as for open()
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write it ({e.strerror or e})") from None


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def removed_on_failure(tmp: Path) -> Iterator[Path]:
    """The temporary file `tmp` is removed when the block raises anything (an error, an interrupt),
    and the exception goes on."""
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_result_json(path: Path, obj: dict[str, Any], inputs: Iterable[Path | str | None] = ()) -> None:
    """A result file (`--json FILE`): stamped, checked, atomic. A file llmc wrote earlier is
    replaced; anything else at the path is refused."""
    check_output(path, inputs, force=True, directory=False, what="result file")
    write_json_atomic(path, stamp_json(obj))


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flag: int) -> bool:
    """Linux renameat2(a, b, flag); False where the platform or filesystem lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flag) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (RENAME_EXCHANGE). False where unsupported."""
    return _renameat2(a, b, RENAME_EXCHANGE)


def _move_new(a: Path, b: Path) -> None:
    """Rename a to b, never over something that appeared at b meanwhile (RENAME_NOREPLACE)."""
    if not _renameat2(a, b, RENAME_NOREPLACE):
        if os.path.lexists(b):
            raise FileExistsError(errno.EEXIST, "appeared while writing", str(b))
        os.rename(a, b)


def _between_renames() -> None:
    """A seam for tests: the instant between the fallback's two renames."""


def _replace_directory(tmp: Path, final: Path) -> None:
    if _exchange(tmp, final):               # now tmp holds the old output
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = temp_path(final, "old")
    os.rename(final, old)
    try:
        _between_renames()
        os.rename(tmp, final)
    except BaseException:
        if not os.path.lexists(final):
            os.rename(old, final)           # put the old output back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_marker(tmp: Path) -> None:
    files = [f for f in _walk(tmp) if f != MARKER]
    (tmp / MARKER).write_text(json.dumps({"producer": producer_stamp(), "files": files}, indent=1) + "\n")


def _normal_modes(root: Path) -> None:
    """Every file and directory of an output gets the mode open()/mkdir() would give it."""
    mask = _umask()
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False,
                     inputs: Iterable[Path | str | None] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `final` (`.FINAL.llmc-tmp.PID`); when the block ends
    without error it gets llmc's marker and normal modes and takes `final`'s place in one step. On
    any error or interrupt it is removed and `final` is left as it was. `final` is checked with
    `check_output` before and again at the swap."""
    final = Path(final)
    inputs = list(inputs)
    check_output(final, inputs, force=overwrite)
    tmp = temp_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(final)
        os.mkdir(tmp)
    except OSError as e:
        raise OutputError(f"{final}: cannot create the output ({e.strerror or e})") from None
    try:
        yield tmp
        _write_marker(tmp)
        _normal_modes(tmp)
        check_output(final, inputs, force=overwrite)      # nothing foreign appeared meanwhile
        if os.path.lexists(final):
            _replace_directory(tmp, final)
        else:
            _move_new(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{final}: cannot write the output ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
