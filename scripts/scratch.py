"""
A scratch copy of the repository to change and test, shared by scripts/kernel_mutants.py (bugs planted in the
kernels) and scripts/exercises.py (the README's Exercises applied): copy, patch, run pytest, read its outcome.
"""
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_repo(dest):
    """The repository's files as they are in the working tree (tracked, and new ones git does not ignore)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if os.path.exists(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))


def patch(dest, path, old, new):
    """Replace `old`, which must occur exactly once in dest/path, by `new`."""
    with open(os.path.join(dest, path)) as fh:
        text = fh.read()
    if text.count(old) != 1:
        raise SystemExit(f"error: the text to replace occurs {text.count(old)} times in {path}, not once: {old!r}")
    with open(os.path.join(dest, path), "w") as fh:
        fh.write(text.replace(old, new))


def env():
    """The environment a newcomer's test run has: no PARSCALE_* variable; a wide terminal, so that pytest does
    not cut each failure's reason short."""
    return dict({k: v for k, v in os.environ.items() if not k.startswith("PARSCALE_")}, COLUMNS="400")


def pytest(dest, args):
    """`python -m pytest -q ARGS -vv -rf` in dest -> (summary line, {failed test: why}, seconds, its output). -vv, -rf
    only report: each test's outcome as it ends (kept even if the process dies) and each failure's reason."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", *args, "-vv", "-rf", "-p", "no:cacheprovider"],
                       cwd=dest, env=env(), capture_output=True, text=True)
    out = r.stdout + r.stderr
    summary = next((ln.strip("= ") for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", ln)), "")
    failed = {test: "" for test in re.findall(r"^(tests/\S+) FAILED", out, re.M)}
    if not summary and r.returncode < 0:  # the test process died, in the test whose line has no outcome
        died = re.search(r"^(tests/\S+) (?!PASSED|FAILED|SKIPPED)(.*)\n(?:.*\n)*?Fatal Python error: (.*)$", out, re.M)
        if died:
            failed[died.group(1)] = f"the test process died here: {died.group(2).strip()} ({died.group(3).strip()})"
        return (f"pytest died (signal {-r.returncode}) after {out.count(' PASSED')} passed, {len(failed)} failed",
                failed, time.time() - t0, out)
    if not summary:
        raise SystemExit(f"error: pytest exited {r.returncode} without running the tests:\n{out[-3000:]}")
    for m in re.finditer(r"^FAILED (\S+)(?: - (.*))?$", out, re.M):
        failed[m.group(1)] = (m.group(2) or "")[:200]
    return summary, failed, time.time() - t0, out


def finish(path, lines, who, failures):
    """Write the log, say where, and exit 1 if anything failed."""
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"[{who}] wrote {path}")
    sys.exit(1 if failures else 0)


def machine():
    """'<date>, <CPU>, <cores> cores, Python x, torch y, g++ z' for a log's header."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    gxx = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    return (f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch_version}, {gxx[0] if gxx else 'no g++'}")


def commit():
    """The commit the scratch copy starts from, and whether the working tree had changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return head.strip() + (" (with uncommitted changes)" if dirty else "")
